"""Load, resolve and validate an inventory plus its release (no host is contacted).

The inventory is a plain Ansible YAML inventory, read by ansible-core itself
(:mod:`flagops.loader`: ``InventoryManager`` + ``VariableManager``, so ``group_vars/``,
``host_vars/``, precedence and vault values are what the playbooks see). This module
merges ``flagops_release_overrides`` over the catalog release, checks both against
``schemas/*.json`` and then the cross-field rules that a schema cannot express. Every
problem is collected and raised at once in a single :class:`ConfigError`, each one
pointing at ``file:line:col`` of the value that caused it.

The release is also checked against the inventory (node count, GPUs per node, TP x PP,
devices, shared memory), and its ``unverified`` fields become warnings
(:class:`~flagops.errors.Unverified`, ``Config.warnings``) that never fail validation.

Public API: :func:`load`, :class:`Config`, :class:`Host`, :func:`load_release`,
:class:`Release`, :func:`list_releases`, :func:`catalog_dirs`, :func:`schema_dir`,
:func:`tp_pp`, :func:`size_bytes`, :func:`field_pointer`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from flagops import loader
from flagops.errors import ConfigError, Location, Problem, Unverified, join_pointer
from flagops.loader import Doc, Vault

PKG_DIR = Path(__file__).resolve().parent

# Values FlagScale pastes unquoted into `export K=V`, `ssh ... "docker exec c bash -c '...'"`
# and hostfile lines. Anything outside these sets could break out of the command. They are
# applied with fullmatch: with match, `$` also accepts a trailing newline ("flagos\n").
CONTAINER_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
# A leading ^ is NCCL's exclusion syntax (NCCL_SOCKET_IFNAME=^lo,docker0); bash -c has no
# history expansion, so it is a plain character there.
ENV_VALUE_RE = re.compile(r"^\^?[A-Za-z0-9_.,:/+=@%-]*$")
SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9._/+-]*$")
NIC_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,14}$")
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
SHELL_META = set(";|&$`()<>'\"\\\n\r\t*?[]{}!#~ ")
TEMPLATE_RE = re.compile(r"\{\{|\{%")
# The one template a credential field may hold: an env lookup of one variable, optionally
# with a literal default. Anything else (lookup('pipe', ...), other lookups, filters,
# expressions) would run on the controller when Ansible renders it.
CREDENTIAL_TEMPLATE_RE = re.compile(
    r"\s*\{\{\s*lookup\(\s*(?P<q>['\"])(env|ansible\.builtin\.env)(?P=q)\s*,\s*"
    r"(?P<q2>['\"])[A-Za-z_][A-Za-z0-9_]*(?P=q2)\s*\)"
    r"(\s*\|\s*default\(\s*(?P<q3>['\"])[A-Za-z0-9_.,:/+=@%-]*(?P=q3)\s*\))?\s*\}\}\s*"
)

# before_start / after_stop are pasted into `bash -c '...'` on every node and joined with
# `&&`, so only these command shapes are accepted, each with shell-safe arguments.
_ARG = r"[A-Za-z0-9_.,:/+=@%-]+"
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_ABS = r"/[A-Za-z0-9._/+-]*"
_CMD_FORMS = [
    (rf"(source|\.) {_ABS}/activate( {_NAME})?", "source /abs/path/bin/activate [env]"),
    (rf"conda activate {_NAME}", "conda activate <env>"),
    (rf"export [A-Za-z_][A-Za-z0-9_]*={_ARG}", "export NAME=value"),
    (rf"cd {_ABS}", "cd /abs/path"),
]
CMD_FORMS: list[tuple[re.Pattern[str], str]] = [(re.compile(rf"^{rx}$"), form) for rx, form in _CMD_FORMS]
# The same rule as one regex for the roles that paste before_start into `bash -c`: each
# mirrors it in vars/main.yml (tests/unit/test_role_guards.py keeps the copies equal).
CMD_PATTERN = "^(?:" + "|".join(rx for rx, _ in _CMD_FORMS) + r")\Z"

# Cluster-wide variables: one value for all hosts (set them in all.vars).
CLUSTER_KEYS = (
    "flagops_release",
    "flagops_share_root",
    "flagops_container_name",
    "flagops_slot_type",
    "flagops_release_overrides",
    "flagops_registry_username",
    "flagops_registry_password",
    "flagops_hub_token",
)
# Secrets must come from a lookup or vault; inline values are rejected and never echoed.
SECRET_KEYS = frozenset(
    {"flagops_registry_password", "flagops_hub_token", "ansible_password", "ansible_become_password",
     "ansible_ssh_pass", "ansible_become_pass"}
)
# Fields that may hold a `{{ lookup(...) }}` (secrets, plus the registry user name).
TEMPLATABLE_KEYS = SECRET_KEYS | {"flagops_registry_username"}
MASTER_GROUP = "master"
WORKER_GROUP = "workers"


# --------------------------------------------------------------------------- messages


def _show(value: Any, limit: int = 60) -> str:
    """A short, single-line rendering of a found value (newlines stay visible as \\n)."""
    if isinstance(value, Vault):
        return "a !vault value"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "a mapping"
    elif isinstance(value, list):
        text = "a list"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        Vault: "string",
        list: "list",
        dict: "mapping",
        type(None): "null",
    }.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- schemas


def schema_dir() -> Path:
    """The shipped ``schemas/`` (one source of truth, also read by the roles' argument specs)."""
    from flagops import resources

    return resources.data("schemas")


def _strict_patterns(node: Any) -> Any:
    """JSON Schema ``pattern``s are searched with Python's ``re``, where ``$`` also matches
    before a trailing newline: ``"node2\n"`` would pass ``^[A-Za-z0-9_.-]*$``. End each
    anchored pattern with ``\\Z`` (the true end) instead."""
    if isinstance(node, dict):
        return {k: (v[:-1] + r"\Z" if k == "pattern" and isinstance(v, str) and v.endswith("$")
                    and not v.endswith(r"\$") else _strict_patterns(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_strict_patterns(v) for v in node]
    return node


@cache
def load_schema(name: str) -> dict[str, Any]:
    return _strict_patterns(json.loads((schema_dir() / f"{name}.schema.json").read_text(encoding="utf-8")))


def _known_keys(schema: dict[str, Any]) -> list[str]:
    return sorted(schema.get("properties", {}))


def _did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def _expected_from(schema: dict[str, Any], default: str) -> str:
    return str(schema.get("description") or default)


@cache
def _validator(schema_name: str, ref: str | None) -> Any:
    """A Draft 2020-12 validator in which an integer is an ``int``: JSON Schema's own
    integer type accepts ``8.0``, which would render as ``slots=8.0``."""
    from jsonschema import Draft202012Validator, validators

    def is_integer(_checker: Any, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", is_integer)
    strict = validators.extend(Draft202012Validator, type_checker=checker)
    schema = load_schema(schema_name)
    if ref:
        schema = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{ref}"}
    return strict(schema)


def _schema_problems(doc: Doc, schema_name: str, secret_keys: frozenset[str],
                     ref: str | None = None) -> list[Problem]:
    validator = _validator(schema_name, ref)
    problems: list[Problem] = []
    for err in validator.iter_errors(doc.data):
        problems.extend(_describe(err, doc, secret_keys))
    return problems


def _describe(err: Any, doc: Doc, secret_keys: frozenset[str]) -> Iterator[Problem]:
    pointer = join_pointer("", *err.absolute_path)
    kind = err.validator
    schema = err.schema if isinstance(err.schema, dict) else {}
    value = err.instance
    last = str(err.absolute_path[-1]) if err.absolute_path else ""
    shown = "a value (hidden)" if last in secret_keys else _show(value)

    if kind == "additionalProperties" and isinstance(value, dict):
        known = _known_keys(schema)
        patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
        for extra in value:
            if extra in known or any(p.search(extra) for p in patterns):
                continue
            hint = _did_you_mean(extra, known)
            yield Problem(
                doc.where(join_pointer(pointer, extra), key=True),
                f"unknown key {_show(extra)}",
                "one of " + ", ".join(known) if len(known) <= 12 else f"one of {len(known)} known keys",
                f"did you mean {_show(hint)}?" if hint else "remove it",
            )
    elif kind == "required" and isinstance(value, dict):
        for key in err.validator_value:
            if key not in value:
                sub = schema.get("properties", {}).get(key, {})
                yield Problem(
                    doc.where(pointer),
                    f"no {_show(key)}",
                    _expected_from(sub, f"a {key!r} key here"),
                    f"add {key}: ...",
                )
    elif "propertyNames" in err.relative_schema_path:
        # jsonschema reports a bad key at its parent's path, with the key as instance.
        yield Problem(
            doc.where(join_pointer(pointer, str(value)), key=True),
            f"key {_show(value)}",
            _expected_from(schema, "a valid name"),
            "rename the key",
        )
    elif kind == "type":
        want = err.validator_value
        want_s = " or ".join(want) if isinstance(want, list) else str(want)
        want_s = want_s.replace("object", "mapping").replace("array", "list")
        yield Problem(
            doc.where(pointer),
            shown if isinstance(value, dict | list) else f"{_type_name(value)} {shown}",
            f"{want_s}" + (f" ({schema['description']})" if schema.get("description") else ""),
            f"write {'an' if want_s[0] in 'aeiou' else 'a'} {want_s} here",
        )
    elif kind in ("enum", "const"):
        choices = err.validator_value if kind == "enum" else [err.validator_value]
        hint = _did_you_mean(str(value), [str(c) for c in choices])
        yield Problem(
            doc.where(pointer),
            shown,
            "one of " + ", ".join(_show(c) for c in choices),
            f"did you mean {_show(hint)}?" if hint else f"use one of {', '.join(map(str, choices))}",
        )
    elif kind == "pattern":
        yield Problem(
            doc.where(pointer),
            shown,
            _expected_from(schema, f"a string matching {err.validator_value}"),
            "change the value to the expected form",
        )
    elif kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kind]
        yield Problem(
            doc.where(pointer),
            shown,
            f"a number {op} {err.validator_value}"
            + (f" ({schema['description']})" if schema.get("description") else ""),
            "change the value into range",
        )
    elif kind == "not":
        yield Problem(
            doc.where(pointer),
            "keys that do not go together (" + ", ".join(sorted(value)) + ")"
            if isinstance(value, dict) else shown,
            "source type modelscope with id[/revision], or http with url",
            "remove the keys of the other source type",
        )
    else:
        yield Problem(doc.where(pointer), shown, err.message, "see schemas/" + "*.schema.json")


# --------------------------------------------------------------------------- catalog


def catalog_dirs() -> list[Path]:
    """Release directories: ``$FLAGOPS_CATALOG`` (os.pathsep list) first, then built-ins."""
    extra = [
        Path(p).expanduser() for p in os.environ.get("FLAGOPS_CATALOG", "").split(os.pathsep) if p
    ]
    return [*extra, PKG_DIR / "releases"]


def list_releases() -> dict[str, Path]:
    """Catalog name -> file. An entry in an earlier directory shadows a later one."""
    found: dict[str, Path] = {}
    for directory in catalog_dirs():
        if not directory.is_dir():
            continue
        for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
            found.setdefault(path.stem, path)
    return found


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    role: str  # "master" | "worker"
    slots: int
    port: int
    user: str | None
    nic: str | None
    # How flagops' own SSH (status, logs, verify) reaches the host, as Ansible does.
    ssh_key_file: str | None = None
    ssh_common_args: str | None = None


# The env variable and literal default of a credential field's one allowed template.
_ENV_LOOKUP_RE = re.compile(
    r"lookup\(\s*['\"](?:ansible\.builtin\.)?env['\"]\s*,\s*['\"](?P<env>[A-Za-z_][A-Za-z0-9_]*)['\"]\s*\)"
    r"(?:\s*\|\s*default\(\s*['\"](?P<default>[^'\"]*)['\"]\s*\))?"
)


@dataclass(frozen=True)
class Credential:
    """A credential field as the inventory writes it (never its secret's value)."""

    key: str
    value: Any = dataclasses.field(repr=False)  # a literal, an env-lookup template or a !vault value
    location: Location

    @property
    def env(self) -> str | None:
        """The variable its env lookup reads (None: a literal or a vault value)."""
        if isinstance(self.value, Vault) or not isinstance(self.value, str):
            return None
        m = _ENV_LOOKUP_RE.search(self.value) if CREDENTIAL_TEMPLATE_RE.fullmatch(self.value) else None
        return m.group("env") if m else None

    def resolved(self, environ: Mapping[str, str]) -> str | None:
        """What Ansible will read for it: the variable's value or the lookup's default
        ("" when neither); None for a vault value (set, but unknown here)."""
        if isinstance(self.value, Vault):
            return None
        if self.env is None:
            return "" if self.value is None else str(self.value)
        m = _ENV_LOOKUP_RE.search(self.value)
        assert m is not None
        return environ.get(self.env) or m.group("default") or ""


def image_registry(ref: str) -> str:
    """The registry host of an image ref, as the image role derives it (its defaults)."""
    first = ref.split("/")[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def unset_credentials(cfg: Config, environ: Mapping[str, str] | None = None,
                      fixes: Mapping[str, str] | None = None) -> list[Problem]:
    """The registry login a pull would go without: a user whose password's env lookup
    reads an unset variable (or the reverse). ``fixes``: env variable -> a better fix
    (the lab's own password file). Values are never shown, only the variable names."""
    env = os.environ if environ is None else environ
    fixes = fixes or {}
    by = {c.key: c for c in cfg.credentials}
    user, pw = by.get("flagops_registry_username"), by.get("flagops_registry_password")
    ref = (cfg.release.get("image") or {}).get("ref") or ""
    registry = image_registry(ref) if isinstance(ref, str) else "docker.io"
    user_value = user.resolved(env) if user is not None else ""
    pw_value = pw.resolved(env) if pw is not None else ""
    problems: list[Problem] = []

    def unset(c: Credential, other: str) -> Problem:
        assert c.env is not None
        fix = fixes.get(c.env) or f"export {c.env} (the {registry} login's {other}) before flagops provision"
        return Problem(c.location, f"{c.key} reads the environment variable {c.env}, which is unset or empty here",
                       f"{c.env} set to the {other} of the {registry} login (the image pull logs in with it)",
                       fix)

    if user_value != "" and pw_value == "":
        if pw is not None and pw.env is not None:
            problems.append(unset(pw, "password"))
        else:
            where = pw.location if pw is not None else user.location  # type: ignore[union-attr]
            problems.append(Problem(where, "flagops_registry_username without a flagops_registry_password",
                                    f"the password of the {registry} login",
                                    "add flagops_registry_password: "
                                    """"{{ lookup('env', 'FLAGOPS_REGISTRY_PASSWORD') }}" """
                                    "and export FLAGOPS_REGISTRY_PASSWORD (or a !vault value)"))
    elif user is not None and user.env is not None and user_value == "" and pw_value != "":
        problems.append(unset(user, "user name"))
    return problems


@dataclass(frozen=True)
class Config:
    """The validated, resolved inventory + release. Hosts are master first."""

    inventory_file: Path
    release_name: str
    release_file: Path
    release: dict[str, Any]
    hosts: tuple[Host, ...]
    share_root: str
    container_name: str
    slot_type: str
    # The release's unverified fields (validate warns, exit status stays 0).
    warnings: tuple[Unverified, ...] = ()
    # The registry login fields as written (literal, env lookup or !vault) with where they
    # are: a provision checks the env lookups are set (:func:`unset_credentials`).
    credentials: tuple[Credential, ...] = ()

    @property
    def master(self) -> Host:
        return self.hosts[0]

    @property
    def workers(self) -> tuple[Host, ...]:
        return self.hosts[1:]

    @property
    def ssh_port(self) -> int:
        """FlagScale's single ``runner.ssh_port``: the workers' sshd (validated equal)."""
        return self.workers[0].port if self.workers else self.master.port

    @property
    def total_slots(self) -> int:
        return sum(h.slots for h in self.hosts)

    def engine_args(self) -> dict[str, Any]:
        """The args vLLM receives: engine_args laid over engine_args_specific.vllm."""
        return effective_engine_args(self.release)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inventory_file": str(self.inventory_file),
            "release_name": self.release_name,
            "release_file": str(self.release_file),
            "share_root": self.share_root,
            "container_name": self.container_name,
            "slot_type": self.slot_type,
            "ssh_port": self.ssh_port,
            "hosts": [h.__dict__ for h in self.hosts],
            "release": self.release,
            "warnings": [w.to_dict() for w in self.warnings],
        }


def effective_engine_args(release: dict[str, Any]) -> dict[str, Any]:
    serve = release.get("serve") or {}
    merged = dict(((serve.get("engine_args_specific") or {}).get("vllm")) or {})
    merged.update(serve.get("engine_args") or {})
    return merged


# --------------------------------------------------------------------------- inventory


def _walk_strings(value: Any, pointer: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_strings(v, join_pointer(pointer, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_strings(v, join_pointer(pointer, i))
    elif isinstance(value, str):
        yield pointer, value


def _unsafe_chars(value: str) -> str:
    bad = sorted({c for c in value if c in SHELL_META or ord(c) < 32})
    return "".join(bad).encode("unicode_escape").decode()


def _show_unsafe(value: str) -> str:
    """The found value, naming its shell-unsafe characters when it has any."""
    unsafe = _unsafe_chars(value)
    return _show(value) + (f" (unsafe characters {unsafe!r})" if unsafe else "")


def _check_templates(doc: Doc, problems: list[Problem], *, secrets_allowed: bool) -> None:
    """Only credential fields may be Jinja templates; elsewhere a template would reach
    FlagScale's files unrendered or be rendered by Ansible from untrusted input."""
    for pointer, value in _walk_strings(doc.data, ""):
        last = pointer.rsplit("/", 1)[-1]
        if secrets_allowed and last in TEMPLATABLE_KEYS and pointer.count("/") == 1:
            continue
        if TEMPLATE_RE.search(value):
            problems.append(
                Problem(doc.where(pointer), f"a template {_show(value)}",
                        "a literal value (templates are allowed only in credential fields: "
                        + ", ".join(sorted(TEMPLATABLE_KEYS)) + ")",
                        "write the literal value")
            )


def _env_name(key: str) -> str:
    return ("FLAGOPS_REGISTRY_PASSWORD" if "registry_password" in key else
            "FLAGOPS_REGISTRY_USERNAME" if "registry_username" in key else
            "MODELSCOPE_API_TOKEN" if "hub" in key else key.upper())


def _check_credentials(hd: Doc, problems: list[Problem]) -> None:
    """Credential fields hold an env lookup or a vault value: any other template would run
    on the controller when Ansible renders it (lookup('pipe', ...), filters, expressions)."""
    for key in sorted(TEMPLATABLE_KEYS & set(hd.data)):
        value = hd.data[key]
        if isinstance(value, Vault) or not isinstance(value, str) or value == "":
            continue
        if CREDENTIAL_TEMPLATE_RE.fullmatch(value):
            continue
        env = _env_name(key)
        if TEMPLATE_RE.search(value):
            found = f"a template that is not a plain env lookup {_show(value)}"
        elif key in SECRET_KEYS:
            found = f"an inline secret ({len(value)} characters, not shown)"
        else:
            continue  # a literal user name is fine
        problems.append(
            Problem(hd.where("/" + key), found,
                    "{{ lookup('env', 'NAME') }} (optionally | default('literal')) or a !vault value",
                    f"""write {key}: "{{{{ lookup('env', '{env}') }}}}" and export {env}""")
        )


def _numeric_host(value: str) -> bool:
    """A name that getaddrinfo()/inet_aton() would read as an IPv4 address (``010.0.0.1``
    is 8.0.0.1, ``192.11`` is 192.0.0.11) although it is not one in dotted-quad form."""
    labels = value.rstrip(".").split(".")
    return bool(labels) and re.fullmatch(r"(0x[0-9a-fA-F]*|[0-9]+)", labels[-1]) is not None


def _check_address(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    head, sep, zone = value.partition("%")
    try:
        ip = ipaddress.ip_address(head)
    except ValueError:
        ip = None
    if ip is not None:
        if not sep:
            return None
        if ip.version == 6 and NIC_RE.fullmatch(zone):
            return None
        return f"an IPv6 zone id {_show(zone)} that is not an interface name"
    if sep:
        return "a '%' outside an IPv6 zone id"
    if HOSTNAME_RE.fullmatch(value):
        if _numeric_host(value):
            return "a numeric name that is not an IP address (the resolver would read it as another address)"
        return None
    unsafe = _unsafe_chars(value)
    return f"unsafe characters {unsafe!r}" if unsafe else "not an IP address or DNS name"


def _address_key(value: str) -> str:
    """One spelling per address: IPs normalised, DNS names case-folded."""
    head, sep, zone = value.partition("%")
    try:
        return str(ipaddress.ip_address(head)) + sep + zone
    except ValueError:
        return value.rstrip(".").lower()


def _check_abs_path(value: str) -> str | None:
    if not value.startswith("/"):
        return "a relative path"
    if any(part == ".." for part in value.split("/")):
        return "a path with '..'"
    if not SAFE_PATH_RE.fullmatch(value):
        return f"unsafe characters {_unsafe_chars(value) or 'outside [A-Za-z0-9._/+-]'!r}"
    if value.rstrip("/") == "":
        return "the filesystem root"
    return None


# ssh options that make ssh on the controller run a program, load code or read more
# options from a file that could do either (ssh_config(5)).
SSH_COMMAND_OPTIONS = frozenset({
    "proxycommand", "localcommand", "permitlocalcommand", "knownhostscommand", "match", "include",
    "remotecommand", "pkcs11provider", "securitykeyprovider", "xauthlocation", "identityagent",
})
# ssh command-line flags with the same effect: -F reads a config file, -I loads a PKCS#11
# library, -E/-S/-G/-V change what runs or where it writes.
SSH_COMMAND_FLAGS = frozenset("FIESGV")
SSH_ARGS_RE = re.compile(r"^[A-Za-z0-9_.,:/+=@%~ -]*$")
SSH_ARG_KEYS = ("ansible_ssh_common_args", "ansible_ssh_extra_args", "ansible_ssh_args",
                "ansible_scp_extra_args", "ansible_sftp_extra_args")


def _check_ssh_args(value: str) -> str | None:
    """Options that reach ssh's argv on the controller: no shell syntax, and none of the
    options that make ssh execute something, in any spelling ssh accepts (``-o Opt=v``,
    ``-oOpt=v``, ``-o Opt v``, any case)."""
    if not SSH_ARGS_RE.fullmatch(value):
        return f"unsafe characters {_unsafe_chars(value.replace(' ', '')) or 'outside the allowed set'!r}"
    runs: set[str] = set()
    for word in value.split():
        if word.startswith("-") and not word.startswith("--"):
            flags = word[1:]
            if flags[:1] == "o":
                word = flags[1:]
            else:
                runs.update(f"-{f}" for f in flags if f in SSH_COMMAND_FLAGS)
                continue
        for part in word.split("="):
            if part.lower() in SSH_COMMAND_OPTIONS:
                runs.add(part)
    return f"ssh option {', '.join(sorted(runs))} runs or loads a program on the controller" if runs else None


@dataclass
class _Inventory:
    doc: Doc
    hosts: list[tuple[str, str, Doc]]  # (name, role, its variables)
    cluster: dict[str, tuple[Any, Location]]
    # False when the master/worker split is broken: slot sums would only echo that error.
    topology_ok: bool = True


def _misplaced(doc: Doc, key: str) -> str | None:
    """Where ``key`` sits in the inventory file when it is not where it counts (a
    mis-indented block), as ``file:line:col`` plus its path; None when absent."""
    for pointer in doc.keys:
        if pointer.rsplit("/", 1)[-1] == key:
            return f"{doc.keys[pointer].file}:{doc.keys[pointer].line}:{doc.keys[pointer].col} ({pointer})"
    return None


def _host_entry(doc: Doc, group: str, host: str) -> Location | None:
    """Where ``host`` is listed directly under ``group`` in the inventory file."""
    suffix = join_pointer("", group, "hosts", host)
    return next((loc for p, loc in doc.keys.items() if p.endswith(suffix)), None)


def _resolve_inventory(ans: loader.Inventory, problems: list[Problem]) -> _Inventory:
    doc = ans.doc
    groups = ans.groups
    children_loc = doc.where("/all/children")
    master = groups.get(MASTER_GROUP)
    workers = groups.get(WORKER_GROUP, [])

    if not master:
        where = ans.group_locations.get(MASTER_GROUP, children_loc)
        found = "no host in group 'master'" if master is not None else "no group 'master'"
        misplaced = _misplaced(doc, MASTER_GROUP) if master is None else None
        if misplaced:
            found += f" (a key 'master' is at {misplaced}: mis-indented?)"
        problems.append(
            Problem(where, found, "exactly one host in all.children.master.hosts (the Ray head)",
                    "add master: {hosts: {node1: {ansible_host: ...}}} under all.children")
        )
    elif len(master) > 1:
        names = ", ".join(master)
        for extra in master[1:]:
            problems.append(
                Problem(ans.host_locations[extra], f"{len(master)} master hosts ({names})",
                        "exactly one master host (FlagScale starts the Ray head on the first hostfile line)",
                        f"move {extra} to the workers group")
            )

    topology_ok = bool(master) and len(master) == 1
    hosts: list[tuple[str, str, Doc]] = [(name, "master", ans.hosts[name]) for name in master or []]
    for name in workers:
        if master and name in master:
            problems.append(
                Problem(_host_entry(doc, WORKER_GROUP, name) or ans.host_locations[name],
                        f"host {_show(name)} in both master and workers",
                        "each host in exactly one of master, workers",
                        f"remove {name} from one of the groups")
            )
            topology_ok = False
            continue
        hosts.append((name, "worker", ans.hosts[name]))
    for name in ans.hosts:
        if name not in (master or []) and name not in workers:
            problems.append(
                Problem(ans.host_locations[name], f"host {_show(name)} in neither master nor workers",
                        "every host in master or workers (flagops provisions every inventory host)",
                        f"move {name} under all.children.workers.hosts, or remove it")
            )
    folded: dict[str, str] = {}
    for name in ans.hosts:
        other = folded.setdefault(name.lower(), name)
        if other != name:
            problems.append(
                Problem(ans.host_locations[name], f"host {_show(name)} and host {_show(other)}",
                        "host names that differ in more than letter case (DNS and ssh ignore case)",
                        f"list the host once, as {other}")
            )
    if not hosts:
        return _Inventory(doc, [], {})

    # Cluster-wide variables come from the master; a host that disagrees is an error
    # because FlagScale has one container name / release / share for all nodes.
    ref_name, _, ref = hosts[0]
    cluster = {k: (ref.data[k], ref.where("/" + k)) for k in CLUSTER_KEYS if k in ref.data}
    for name, _, hd in hosts[1:]:
        for key in CLUSTER_KEYS:
            a, b = ref.data.get(key), hd.data.get(key)
            if a != b:
                loc = hd.where("/" + key) if key in hd.data else ref.where("/" + key)
                missing = next((h for h, d in ((ref_name, ref.data), (name, hd.data)) if key not in d), None)
                found = (f"{key} set for some hosts but not for {missing} (in a group {missing} is not in?)"
                         if missing else f"{key}={_show(b)} on {name} but {_show(a)} on {ref_name}")
                problems.append(Problem(loc, found, "one cluster-wide value", f"set {key} once in all.vars"))

    addresses: dict[str, str] = {}
    for name, _role, hd in hosts:
        hv = hd.data
        problems.extend(_schema_problems(hd, "inventory", SECRET_KEYS, ref="vars"))
        _check_templates(hd, problems, secrets_allowed=True)
        for key, what in (("ansible_host", "the host's address"), ("flagops_slots", "its GPU slots")):
            if key not in hv:
                found = f"host {_show(name)} without {key}"
                misplaced = _misplaced(doc, key)
                if misplaced:
                    found += f" (a key {key} is at {misplaced}, where it does not apply to {name}: mis-indented?)"
                problems.append(
                    Problem(ans.host_locations[name], found, f"{key} ({what})",
                            f"add {key}: ... under {name} or in a group's vars")
                )
        if "ansible_host" in hv:
            addr = hv["ansible_host"]
            why = _check_address(addr)
            if why and not TEMPLATE_RE.search(str(addr)):
                problems.append(
                    Problem(hd.where("/ansible_host"), f"{_show(addr)} ({why})",
                            "an IPv4/IPv6 address or DNS name (it is pasted into ssh and the hostfile)",
                            "use the node's plain IP address")
                )
            elif isinstance(addr, str):
                key = _address_key(addr)
                if key in addresses:
                    problems.append(
                        Problem(hd.where("/ansible_host"), f"address {addr} on {name} and {addresses[key]}",
                                "a unique address per host (FlagScale rejects duplicate hostfile entries)",
                                f"give {name} its own address")
                    )
                else:
                    addresses[key] = name
        nic = hv.get("flagops_nic")
        if isinstance(nic, str) and not NIC_RE.fullmatch(nic):
            problems.append(
                Problem(hd.where("/flagops_nic"), _show_unsafe(nic),
                        "an interface name of up to 15 letters, digits, _ . : -",
                        "use the name `ip -br link` shows, e.g. bond0")
            )
        for key in SSH_ARG_KEYS:
            if isinstance(hv.get(key), str) and (why := _check_ssh_args(hv[key])):
                problems.append(
                    Problem(hd.where("/" + key), f"{_show(hv[key])} ({why})",
                            "ssh options of letters, digits and _ . , : / + = @ % ~ - that run no command",
                            "keep -o Option=value pairs such as UserKnownHostsFile; for a bastion use "
                            "-o ProxyJump=user@host (or -J user@host) instead of ProxyCommand")
                )
        _check_credentials(hd, problems)

    worker_ports = {hd.data["ansible_port"] for _, role, hd in hosts
                    if role == "worker" and isinstance(hd.data.get("ansible_port"), int)}
    if len(worker_ports) > 1:
        for name, role, hd in hosts:
            if role == "worker" and "ansible_port" in hd.data:
                problems.append(
                    Problem(hd.where("/ansible_port"),
                            f"ansible_port {hd.data['ansible_port']} on {name} among worker ports "
                            + ", ".join(map(str, sorted(worker_ports))),
                            "one ssh port for all workers (FlagScale has a single runner.ssh_port)",
                            "run every worker's sshd on the same port")
                )

    vars_loc = doc.where("/all/vars", key=True) if "/all/vars" in doc.keys else doc.where("/all", key=True)
    for key in ("flagops_share_root", "flagops_container_name"):
        if key not in cluster:
            found = f"no {key}"
            misplaced = _misplaced(doc, key)
            if misplaced:
                found += f" that applies to the hosts (a key {key} is at {misplaced}: mis-indented?)"
            problems.append(Problem(vars_loc, found, f"{key} in all.vars", f"add {key}: ... to all.vars"))
    if "flagops_share_root" in cluster:
        value, loc = cluster["flagops_share_root"]
        why = _check_abs_path(value) if isinstance(value, str) else None
        if why:
            problems.append(
                Problem(loc, f"{_show(value)} ({why})",
                        "an absolute path of letters, digits, . _ / + - without '..'",
                        "use the mount point of the shared storage, e.g. /share")
            )
    if "flagops_container_name" in cluster:
        value, loc = cluster["flagops_container_name"]
        if isinstance(value, str) and not CONTAINER_NAME_RE.fullmatch(value):
            problems.append(
                Problem(loc, _show_unsafe(value),
                        "a docker container name [a-zA-Z0-9][a-zA-Z0-9_.-]*",
                        "use a plain name such as flagos")
            )
    return _Inventory(doc, hosts, cluster, topology_ok)


# --------------------------------------------------------------------------- release


def _drop_subtree(doc: Doc, pointer: str) -> None:
    doc.deleted.update(p for p in doc.values if p == pointer or p.startswith(pointer + "/"))
    for table in (doc.values, doc.keys):
        for p in [p for p in table if p == pointer or p.startswith(pointer + "/")]:
            del table[p]


def _graft(doc: Doc, pointer: str, src: Doc, src_pointer: str) -> None:
    for table, src_table in ((doc.values, src.values), (doc.keys, src.keys)):
        for p, loc in src_table.items():
            if p == src_pointer or p.startswith(src_pointer + "/"):
                table[pointer + p[len(src_pointer):]] = loc


def merge_overrides(base: Doc, overrides: Any, inv: Doc, over_ptr: str) -> None:
    """Deep-merge ``overrides`` (found at ``over_ptr`` in ``inv``) into ``base`` in place.

    Mappings merge key by key, anything else replaces, and null deletes the key. The
    origin maps follow so errors in overridden values point into the inventory.
    """

    def merge(target: dict[str, Any], tptr: str, over: dict[str, Any], optr: str) -> None:
        for key, value in over.items():
            rp, op = join_pointer(tptr, key), join_pointer(optr, key)
            if value is None:
                target.pop(key, None)
                _drop_subtree(base, rp)
            elif isinstance(value, dict) and isinstance(target.get(key), dict):
                merge(target[key], rp, value, op)
            else:
                target[key] = copy.deepcopy(value)
                _drop_subtree(base, rp)
                _graft(base, rp, inv, op)

    if isinstance(overrides, dict) and isinstance(base.data, dict):
        merge(base.data, "", overrides, over_ptr)


def _check_command(value: str) -> str | None:
    if any(ord(c) < 32 for c in value):  # a newline or tab would survive the strip() below
        return f"{_show(value)} (unsafe characters {_unsafe_chars(value)!r})"
    parts = [p.strip() for p in value.split("&&")]
    for part in parts:
        if not any(rx.fullmatch(part) for rx, _ in CMD_FORMS):
            unsafe = _unsafe_chars(part.replace(" ", ""))
            return f"{_show(part)}" + (f" (unsafe characters {unsafe!r})" if unsafe else " (not an allowed command)")
    return None


def _mapping(value: Any) -> dict[str, Any]:
    """``value`` if it is a mapping, else {} (schema errors are reported separately)."""
    return value if isinstance(value, dict) else {}


def _release_problems(doc: Doc, inv: _Inventory | None, problems: list[Problem]) -> None:
    rel = doc.data
    if not isinstance(rel, dict):
        return
    _check_templates(doc, problems, secrets_allowed=False)
    model = _mapping(rel.get("model"))
    serve = _mapping(rel.get("serve"))
    engine_args = _mapping(serve.get("engine_args"))
    specific_vllm = _mapping(_mapping(serve.get("engine_args_specific")).get("vllm"))

    name = model.get("name")
    if isinstance(name, str) and "model" in engine_args:
        want = f"/models/{name}"
        if engine_args["model"] != want:
            problems.append(
                Problem(doc.where("/serve/engine_args/model"), _show(engine_args["model"]),
                         f"{_show(want)} (the container mounts <share>/models at /models)",
                         f"set serve.engine_args.model: {want}")
            )

    for base, args in (("/serve/engine_args", engine_args),
                       ("/serve/engine_args_specific/vllm", specific_vllm)):
        for key, value in args.items():
            if value is False:
                problems.append(
                    Problem(doc.where(join_pointer(base, key)), f"{key}: false",
                             "true, or no key (FlagScale's flatten_dict_to_args drops false values, "
                             "so vLLM would use its default)",
                             f"delete {key}, or write no_{key}: true to pass --no-{key.replace('_', '-')}")
                )

    runner = _mapping(rel.get("runner"))
    for key in ("before_start", "after_stop"):
        value = runner.get(key)
        if isinstance(value, str):
            bad = _check_command(value)
            if bad:
                problems.append(
                    Problem(doc.where(f"/runner/{key}"), bad,
                             "commands joined by ' && ', each one of: " + "; ".join(f for _, f in CMD_FORMS),
                             "use e.g. `source /root/miniconda3/bin/activate flagscale-inference`")
                )
    envs = _mapping(runner.get("envs"))
    for key, value in envs.items():
        if isinstance(value, str) and not ENV_VALUE_RE.fullmatch(value):
            problems.append(
                Problem(doc.where(join_pointer("/runner/envs", key)),
                         _show_unsafe(value),
                         "a value of letters, digits and _ . , : / + = @ % - (FlagScale writes "
                         "`export K=V` unquoted inside bash -c '...')",
                         "drop the shell characters; set complex values in the image instead")
            )

    _catalog_problems(doc, problems)
    if inv is None:
        _topology_self_check(doc, problems)
    if inv is None or not inv.hosts or not inv.topology_ok:
        return
    _needs_problems(doc, inv, problems)
    slots: list[tuple[str, int]] = []
    for hname, _, hd in inv.hosts:
        s = hd.data.get("flagops_slots")
        if not isinstance(s, int) or isinstance(s, bool):
            return
        slots.append((hname, s))
    args = {**specific_vllm, **engine_args}
    tp, pp = args.get("tensor_parallel_size", 1), args.get("pipeline_parallel_size", 1)
    if not (isinstance(tp, int) and isinstance(pp, int)) or isinstance(tp, bool) or isinstance(pp, bool):
        return
    tp_ptr = ("/serve/engine_args/tensor_parallel_size" if "tensor_parallel_size" in engine_args
              else "/serve/engine_args_specific/vllm/tensor_parallel_size")
    total = sum(s for _, s in slots)
    if tp * pp != total:
        detail = " + ".join(f"{n} {s}" for n, s in slots)
        problems.append(
            Problem(doc.where(tp_ptr),
                     f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} = {tp * pp} "
                     f"but {total} slots ({detail})",
                     "tensor_parallel_size x pipeline_parallel_size == the sum of flagops_slots",
                     "change the parallel sizes or the hosts' flagops_slots")
        )
    for hname, s in slots:
        # A TP group fits in one node, or spans whole nodes (FlagScale's Kimi-K2 example:
        # TP16 over 2 x 8); a group that ends inside a node mixes NVLink and network links.
        if tp > s and tp % s:
            problems.append(
                Problem(doc.where(tp_ptr),
                         f"tensor_parallel_size {tp} > {s} slots on {hname} and not a multiple of {s}",
                         "tensor_parallel_size <= the slots of every node, or a multiple of them (a TP group "
                         "fills one node or whole nodes)",
                         f"lower tensor_parallel_size to {s} or less and raise pipeline_parallel_size")
            )
    slot_type = inv.cluster.get("flagops_slot_type", ("gpu", None))[0]
    cvd = envs.get("CUDA_VISIBLE_DEVICES")
    if slot_type == "gpu" and isinstance(cvd, str | int) and not isinstance(cvd, bool):
        ids = [x for x in str(cvd).split(",") if x.strip()]
        for hname, s in slots:
            if len(ids) < s:
                problems.append(
                    Problem(doc.where("/runner/envs/CUDA_VISIBLE_DEVICES"),
                             f"{len(ids)} visible GPUs ({cvd}) but {s} slots on {hname}",
                             "at least as many CUDA_VISIBLE_DEVICES ids as slots",
                             "list every GPU id, e.g. 0,1,2,3,4,5,6,7")
                )
                break


# --------------------------------------------------------------------------- catalog rules


# Container paths roles/container always mounts (the share and the kernel caches).
RESERVED_MOUNTS = frozenset({"/share", "/models", "/repos", "/flagops", "/flagops/triton-cache",
                             "/flagops/flaggems-cache"})


def field_pointer(field: str) -> str:
    """``serve.engine_args.port`` -> ``/serve/engine_args/port`` (the unverified map's keys)."""
    return join_pointer("", *field.split("."))


def _lookup(data: Any, pointer: str) -> tuple[bool, Any]:
    """(True, value) when ``pointer`` names a value in ``data``."""
    node = data
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return False, None
    return True, node


def size_bytes(value: Any) -> int | None:
    """Docker's size strings (``32G``, ``512g``, ``1T``; 1024-based) in bytes; None if not one."""
    m = re.fullmatch(r"([0-9]+)([bkmgtBKMGT]?)", str(value))
    if not m:
        return None
    return int(m.group(1)) * 1024 ** "bkmgt".index((m.group(2) or "b").lower())


def tp_pp(release: dict[str, Any]) -> tuple[Any, Any]:
    args = effective_engine_args(release)
    return args.get("tensor_parallel_size", 1), args.get("pipeline_parallel_size", 1)


def _tp_pointer(doc: Doc) -> str:
    engine_args = _mapping(_mapping(doc.data.get("serve")).get("engine_args"))
    return ("/serve/engine_args/tensor_parallel_size" if "tensor_parallel_size" in engine_args
            else "/serve/engine_args_specific/vllm/tensor_parallel_size")


def _catalog_problems(doc: Doc, problems: list[Problem]) -> None:
    """Rules of the catalog's own data: unverified names real fields, vendor flags agree."""
    rel = doc.data
    for field in _mapping(rel.get("unverified")):
        ptr = field_pointer(field)
        found, _ = _lookup(rel, ptr)
        if not found and ptr not in doc.deleted:
            problems.append(
                Problem(doc.where(join_pointer("/unverified", field), key=True),
                         f"unverified field {_show(field)} that the release does not have",
                         "a dotted path of a value in this release, e.g. serve.engine_args.port",
                         "correct the path, or remove the entry")
            )
    container = _mapping(rel.get("container"))
    mounts = container.get("mounts")
    for i, mount in enumerate(mounts if isinstance(mounts, list) else []):
        if not isinstance(mount, str):
            continue
        host, _, rest = mount.partition(":")
        target = rest.partition(":")[0]
        why = next((w for w in (_check_abs_path(host), _check_abs_path(target)) if w), None)
        if why is None and target.rstrip("/") in RESERVED_MOUNTS:
            why = f"{target} is flagops' own mount"
        if why:
            problems.append(
                Problem(doc.where(join_pointer("/container/mounts", i)), f"{_show(mount)} ({why})",
                         "/host/path:/container/path[:ro], absolute, without '..', not over "
                         + ", ".join(sorted(RESERVED_MOUNTS)),
                         "mount another path (the share, /models and /repos are always mounted)")
            )
    vendor = rel.get("vendor", "nvidia")
    if isinstance(vendor, str) and vendor != "nvidia" and container.get("gpus", "all") == "all":
        problems.append(
            Problem(doc.where("/container/gpus" if "gpus" in container else "/vendor"),
                     f"vendor {vendor} with container.gpus all" + ("" if "gpus" in container else " (the default)"),
                     "container.gpus: none for a vendor other than nvidia (--gpus all is the NVIDIA "
                     "container runtime)",
                     "set container.gpus: none and pass the accelerator in container.devices")
        )


def _topology_self_check(doc: Doc, problems: list[Problem]) -> None:
    """A catalog entry on its own: TP x PP fills exactly its nodes x GPUs."""
    topo = _mapping(doc.data.get("topology"))
    nodes, per_node = topo.get("nodes"), topo.get("gpus_per_node")
    tp, pp = tp_pp(doc.data)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (nodes, per_node, tp, pp)):
        return
    if tp * pp != nodes * per_node:
        problems.append(
            Problem(doc.where(_tp_pointer(doc)),
                     f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} = {tp * pp} but topology "
                     f"{nodes} nodes x {per_node} GPUs = {nodes * per_node}",
                     "tensor_parallel_size x pipeline_parallel_size == topology.nodes x topology.gpus_per_node",
                     "correct the parallel sizes or the topology")
        )


def _needs_problems(doc: Doc, inv: _Inventory, problems: list[Problem]) -> None:
    """What the release needs of the inventory: its node count, GPUs per node, the devices
    it passes to docker and its shared memory."""
    rel = doc.data
    name = rel.get("name")
    topo = _mapping(rel.get("topology"))
    nodes, per_node = topo.get("nodes"), topo.get("gpus_per_node")
    hosts = inv.hosts
    if isinstance(nodes, int) and not isinstance(nodes, bool) and nodes != len(hosts):
        listed = ", ".join(h for h, _, _ in hosts)
        problems.append(
            Problem(doc.where("/topology/nodes"),
                     f"release {name} for {nodes} node{'s' if nodes != 1 else ''} but the inventory has "
                     f"{len(hosts)} ({listed})",
                     "one master plus workers hosts: as many as the release's topology.nodes",
                     f"list {nodes} hosts, or pick a release for {len(hosts)} node{'s' if len(hosts) != 1 else ''} "
                     "(flagops releases); a stand-in cluster overrides topology.nodes")
        )
    slot_type = inv.cluster.get("flagops_slot_type", ("gpu", None))[0]
    if slot_type == "gpu" and isinstance(per_node, int) and not isinstance(per_node, bool):
        for hname, _, hd in hosts:
            s = hd.data.get("flagops_slots")
            if isinstance(s, int) and not isinstance(s, bool) and s != per_node:
                problems.append(
                    Problem(hd.where("/flagops_slots"),
                             f"flagops_slots {s} on {hname} but release {name} runs {per_node} GPUs per node",
                             "each host's flagops_slots == the release's topology.gpus_per_node",
                             f"set flagops_slots: {per_node} on hosts with {per_node} GPUs, or override "
                             "topology.gpus_per_node and the parallel sizes")
                )
    container = _mapping(rel.get("container"))
    devices = [d.split(":")[0] for d in container.get("devices") or [] if isinstance(d, str)]
    for hname, _, hd in hosts:
        have = hd.data.get("flagops_devices")
        have = [h for h in have if isinstance(h, str)] if isinstance(have, list) else []
        missing = [d for d in devices
                   if not any(d == h.rstrip("/") or d.startswith(h.rstrip("/") + "/") for h in have)]
        if missing:
            problems.append(
                Problem(hd.where("/flagops_devices"),
                         f"{hname} without {', '.join(missing)} in flagops_devices"
                         + (f" ({', '.join(have)})" if have else ""),
                         f"every node to have the devices release {name} passes to docker (container.devices: "
                         + ", ".join(devices) + ")",
                         f"add flagops_devices: [{', '.join(missing)}] to the hosts that have them (e.g. "
                         "InfiniBand: ls /dev/infiniband), or override container.devices")
            )
    need = size_bytes(container.get("shm_size")) if container.get("shm_size") is not None else None
    if need:
        for hname, _, hd in hosts:
            have_s = hd.data.get("flagops_shm_size")
            if isinstance(have_s, str) and (have_b := size_bytes(have_s)) is not None and have_b < need:
                problems.append(
                    Problem(hd.where("/flagops_shm_size"),
                             f"/dev/shm of {have_s} on {hname} but release {name} needs "
                             f"{container['shm_size']} (container.shm_size)",
                             "each host's flagops_shm_size >= the release's container.shm_size "
                             "(with --ipc=host the container uses the host's /dev/shm)",
                             f"grow the host's /dev/shm (mount -o remount,size={container['shm_size']} /dev/shm) "
                             "and update flagops_shm_size")
                )


def release_warnings(doc: Doc, release_file: str) -> list[Unverified]:
    """One warning per ``unverified`` field that still holds the catalog's value (a field
    the inventory overrode or deleted is the operator's own value and is not warned about)."""
    out: list[Unverified] = []
    for field, reason in _mapping(doc.data.get("unverified")).items():
        ptr = field_pointer(field)
        found, _ = _lookup(doc.data, ptr)
        loc = doc.where(ptr)
        if not found or loc.file != release_file or not isinstance(reason, str):
            continue
        out.append(Unverified(loc, field, reason))
    return out


# --------------------------------------------------------------------------- entry point


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(set(problems), key=lambda p: (p.location.file, p.location.line, p.location.col,
                                                p.location.pointer, p.found))


def _display_path(path: Path) -> str:
    """Relative to the CWD when below it (short, clickable messages), else absolute."""
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else rel


def load(inventory: str | os.PathLike[str], release: str | None = None) -> Config:
    """Load and validate ``inventory`` (and ``release``, default its flagops_release).

    Args:
        inventory: path of the Ansible YAML inventory (its group_vars/ and host_vars/ too).
        release: catalog name overriding the inventory's ``flagops_release``.

    Returns:
        The resolved :class:`Config` (master first).

    Raises:
        ConfigError: with every problem found, each with file:line:col.
    """
    inv_path = Path(inventory)
    display = str(inventory)
    problems: list[Problem] = []
    raw, parse_problems = loader.load_doc(inv_path, display)
    if parse_problems:
        raise ConfigError(parse_problems)
    if raw.data is None:
        raise ConfigError([Problem(Location(display, 1, 1, ""), "an empty file",
                                   "an Ansible YAML inventory with all:", "see inventories/a800.yaml")])
    problems += _schema_problems(raw, "inventory", SECRET_KEYS)
    if problems:
        # The file's shape is wrong: Ansible would refuse it or read it otherwise.
        raise ConfigError(_sorted(problems))
    ans, ans_problems = loader.load_inventory(inv_path, display)
    if ans is None:
        raise ConfigError(ans_problems)
    inv = _resolve_inventory(ans, problems)
    inv_doc = inv.doc

    rel_doc: Doc | None = None
    rel_path: Path | None = None
    release_name: str | None = release
    if release_name is not None:
        rel_loc = Location("<command line>", 1, 1, "/--release")
    elif "flagops_release" in inv.cluster:
        release_name, rel_loc = inv.cluster["flagops_release"]
    else:
        rel_loc = inv_doc.where("/all/vars", key=True) if "/all/vars" in inv_doc.keys else inv_doc.where("/all")
        found = "no flagops_release"
        misplaced = _misplaced(inv_doc, "flagops_release")
        if misplaced:
            found += f" that applies to the hosts (a key flagops_release is at {misplaced}: mis-indented?)"
        elif not inv.hosts:
            found += " (and no hosts)"
        problems.append(Problem(rel_loc, found, "a release name in all.vars",
                                "add flagops_release: ernie45 to all.vars or pass --release"))
    if isinstance(release_name, str):
        rel_doc, rel_path = _catalog_doc(release_name, rel_loc, problems)
        if rel_doc is not None:
            if "flagops_release_overrides" in inv.cluster:
                master_doc = inv.hosts[0][2]
                merge_overrides(rel_doc, master_doc.data["flagops_release_overrides"], master_doc,
                                "/flagops_release_overrides")
            problems += _schema_problems(rel_doc, "release", frozenset())
            _release_problems(rel_doc, inv, problems)

    if problems:
        raise ConfigError(_sorted(problems))

    assert rel_doc is not None and rel_path is not None
    assert isinstance(release_name, str)
    hosts = tuple(
        Host(
            name=name,
            address=hd.data["ansible_host"],
            role=role,
            slots=hd.data["flagops_slots"],
            port=hd.data.get("ansible_port", 22),
            user=hd.data.get("ansible_user"),
            nic=hd.data.get("flagops_nic"),
            ssh_key_file=hd.data.get("ansible_ssh_private_key_file") or hd.data.get("ansible_private_key_file"),
            ssh_common_args=hd.data.get("ansible_ssh_common_args"),
        )
        for name, role, hd in inv.hosts
    )
    return Config(
        inventory_file=inv_path.resolve(),
        release_name=release_name,
        release_file=rel_path,
        release=rel_doc.data,
        hosts=hosts,
        share_root=inv.cluster["flagops_share_root"][0].rstrip("/") or "/",
        container_name=inv.cluster["flagops_container_name"][0],
        slot_type=inv.cluster.get("flagops_slot_type", ("gpu", None))[0],
        warnings=tuple(release_warnings(rel_doc, _display_path(rel_path))),
        credentials=tuple(Credential(k, *inv.cluster[k]) for k in ("flagops_registry_username",
                                                                     "flagops_registry_password")
                          if k in inv.cluster),
    )


def _catalog_doc(name: str, where: Location, problems: list[Problem]) -> tuple[Doc | None, Path | None]:
    """The catalog file of release ``name``, parsed, its name checked; (None, path-or-None)
    with the problems appended when it is unknown or unreadable."""
    catalog = list_releases()
    path = catalog.get(name)
    if path is None:
        hint = _did_you_mean(name, catalog)
        problems.append(
            Problem(where, f"release {_show(name)}",
                     "a catalog release (" + ", ".join(sorted(catalog)) + ")",
                     (f"did you mean {_show(hint)}?" if hint else "pick one of the catalog")
                     + " (add catalogs with $FLAGOPS_CATALOG)")
        )
        return None, None
    doc, parse = loader.load_doc(path, _display_path(path))
    problems += parse
    if parse:
        return None, path
    if not isinstance(doc.data, dict):
        problems.append(Problem(doc.where(""), f"{_type_name(doc.data)}",
                                "a release mapping", "see flagops/releases/ernie45.yaml"))
        return None, path
    if doc.data.get("name") != path.stem:
        problems.append(
            Problem(doc.where("/name"), f"name {_show(doc.data.get('name'))}",
                     f"name: {path.stem} (the file name)", "make them equal")
        )
    return doc, path


@dataclass(frozen=True)
class Release:
    """A catalog entry validated on its own (no inventory): what `flagops releases` shows."""

    name: str
    file: Path
    data: dict[str, Any]
    warnings: tuple[Unverified, ...]


def load_release(name: str) -> Release:
    """Load and validate catalog release ``name`` without an inventory.

    Raises:
        ConfigError: unknown name (the problem lists the catalog) or an invalid entry.
    """
    problems: list[Problem] = []
    doc, path = _catalog_doc(name, Location("<command line>", 1, 1, "/NAME"), problems)
    if doc is not None:
        problems += _schema_problems(doc, "release", frozenset())
        _release_problems(doc, None, problems)
    if problems:
        raise ConfigError(_sorted(problems))
    assert doc is not None and path is not None
    return Release(name, path, doc.data, tuple(release_warnings(doc, _display_path(path))))
