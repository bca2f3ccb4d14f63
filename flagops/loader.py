"""Read YAML files and Ansible inventories the way Ansible does, and safely.

Three layers, each used by :mod:`flagops.config`:

- :func:`prescan` looks at a file's bytes and YAML events before any object is built: a
  size cap, UTF-8, one document whose top is a mapping, only the tags Ansible's loader
  knows, and a bound on how far aliases expand (an alias bomb fails here in milliseconds).
- :func:`load_doc` loads a file with Ansible's own ``DataLoader``. ansible-core 2.19 tags
  every value and key with its ``Origin`` (file, line, column); a :class:`Doc` is the
  plain data plus a JSON pointer -> :class:`~flagops.errors.Location` map built from them.
- :func:`load_inventory` parses an inventory with ansible-core's ``InventoryManager`` and
  ``VariableManager`` (``group_vars/``, ``host_vars/``, Ansible's precedence, vault values)
  restricted to the builtin ``yaml`` inventory plugin and the builtin ``host_group_vars``
  vars plugin, with flagops' own configuration: nothing in an inventory, and no
  ``ansible.cfg`` in the current directory, makes the controller run a script or import a
  plugin while validating.

Public API: :func:`prescan`, :func:`load_doc`, :func:`load_inventory`, :class:`Doc`,
:class:`Vault`, :class:`Inventory`, :data:`MAX_BYTES`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flagops.errors import Location, Problem, join_pointer, printable

MAX_BYTES = 1024 * 1024  # an inventory or release larger than 1 MiB is a mistake or an attack
MAX_NODES = 200_000  # YAML nodes after alias expansion (a real inventory has a few hundred)
MAX_VAR_FILES = 1000  # files under group_vars/ and host_vars/ that are pre-scanned

_CORE = "tag:yaml.org,2002:"
# Tags Ansible's loader constructs: the YAML core schema, plus Ansible's own two.
ALLOWED_TAGS = frozenset(
    {*(_CORE + t for t in ("str", "int", "float", "bool", "null", "map", "seq", "merge")),
     "!", "!vault", "!unsafe"}
)
# Vars files that ansible.builtin.host_group_vars reads (its default `_valid_extensions`).
VAR_FILE_SUFFIXES = ("", ".yml", ".yaml", ".json")
# Variables VariableManager adds itself; everything else in its result came from the inventory.
MAGIC_VARS = frozenset({
    "ansible_config_file", "ansible_facts", "ansible_playbook_python", "ansible_version",
    "group_names", "groups", "inventory_dir", "inventory_file", "inventory_hostname",
    "inventory_hostname_short", "playbook_dir", "omit", "ansible_check_mode", "ansible_diff_mode",
    "ansible_forks", "ansible_inventory_sources", "ansible_limit", "ansible_run_tags",
    "ansible_skip_tags", "ansible_verbosity", "ansible_play_hosts", "ansible_play_batch",
})


# How every Ansible that flagops starts reads inventories (validate here, and each playbook
# run through flagops.runner): the YAML plugin alone, so an executable inventory file is
# never run as a script (a YAML file may start with a '#!' comment), and the builtin
# group_vars/host_vars plugin alone; an unparsable source is an error, not a warning.
INVENTORY_ENV = {
    "ANSIBLE_INVENTORY_ENABLED": "yaml",
    "ANSIBLE_VARS_ENABLED": "host_group_vars",
    "ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": "True",
    "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
}


class Vault(str):
    """An Ansible ``!vault`` value: a secret, passed through and never shown or decrypted."""


def _problem(file: str, line: int, col: int, found: str, expected: str, fix: str) -> Problem:
    return Problem(Location(file, line, col, ""), found, expected, fix)


# --------------------------------------------------------------------------- prescan


def _line_col(text: bytes, offset: int) -> tuple[int, int]:
    line = text.count(b"\n", 0, offset) + 1
    return line, offset - (text.rfind(b"\n", 0, offset) + 1) + 1


def prescan(path: Path, display: str) -> list[Problem]:
    """Hazards found in ``path`` before it is loaded; [] when it is safe to load.

    Never raises for bad content: every outcome is a :class:`Problem` at a position.
    """
    try:
        size = path.stat().st_size
        if not path.is_file():
            return [_problem(display, 1, 1, "not a regular file", "an inventory file (YAML)",
                             "pass the inventory file itself; group_vars/ and host_vars/ next to it are read too")]
        if size > MAX_BYTES:
            return [_problem(display, 1, 1, f"a file of {size} bytes", f"at most {MAX_BYTES} bytes (1 MiB)",
                             "split it into group_vars/ and host_vars/ files, or remove what flagops does not use")]
        raw = path.read_bytes()
    except OSError as exc:
        return [_problem(display, 1, 1, f"unreadable file ({exc.strerror})", "a readable YAML file", "check the path")]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, col = _line_col(raw, exc.start)
        return [_problem(display, line, col, f"the byte 0x{raw[exc.start]:02x}, which is not UTF-8",
                         "a UTF-8 text file", "re-save the file as UTF-8")]
    return _scan_events(text, display)


def _scan_events(text: str, display: str) -> list[Problem]:
    problems: list[Problem] = []
    anchors: dict[str, int] = {}
    # One frame per open collection: [anchor, expanded size so far, keys seen (a mapping's)
    # or None, True when the next node is a mapping key, current key or list index].
    stack: list[list[Any]] = []
    documents = 0
    total = 0

    def mark(event: Any) -> tuple[int, int]:
        m = event.start_mark
        return (m.line + 1, m.column + 1) if m else (1, 1)

    def close(size: int, anchor: str | None) -> None:
        nonlocal total
        if anchor:
            anchors[anchor] = size
        if stack:
            stack[-1][1] += size
            if stack[-1][2] is not None:
                stack[-1][3] = not stack[-1][3]
            else:
                stack[-1][4] += 1
        else:
            total += size

    def key_seen(event: Any) -> None:
        """Ansible keeps the last of two equal keys (with a warning): the first is lost."""
        frame = stack[-1] if stack else None
        if frame is None or frame[2] is None or not frame[3] or not isinstance(event, yaml.ScalarEvent):
            return
        if event.value in frame[2]:
            line, col = mark(event)
            pointer = join_pointer("", *(f[4] for f in stack[:-1]), event.value)
            problems.append(Problem(Location(display, line, col, pointer),
                                    f"duplicate key {json.dumps(event.value, ensure_ascii=False)}",
                                    "each key once per mapping (Ansible keeps only the last)",
                                    "remove or rename one of them"))
        frame[2].add(event.value)
        frame[4] = event.value

    parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # only its parser is used
    try:
        while True:
            event = parser.get_event()
            if event is None or isinstance(event, yaml.StreamEndEvent):
                break
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    line, col = mark(event)
                    problems.append(_problem(display, line, col, "a second YAML document",
                                             "one document", "remove the '---' and what follows, or merge it"))
                    break
                first = parser.peek_event()
                if not isinstance(first, yaml.MappingStartEvent | yaml.DocumentEndEvent):
                    line, col = mark(first)
                    what = ("a list" if isinstance(first, yaml.SequenceStartEvent)
                            else f"the scalar {printable(repr(getattr(first, 'value', '')))[:60]}")
                    problems.append(_problem(display, line, col, f"{what} at the top of the document",
                                             "a mapping (all: ...)", "start the file with all:"))
                    break
                continue
            tag = getattr(event, "tag", None)
            if tag and tag not in ALLOWED_TAGS and not (
                    isinstance(event, yaml.ScalarEvent | yaml.MappingStartEvent | yaml.SequenceStartEvent)
                    and event.implicit is True):
                line, col = mark(event)
                problems.append(_problem(display, line, col, f"the tag {printable(tag)!r}",
                                         "plain YAML values (tags: !vault, !unsafe)",
                                         "remove the tag; flagops and Ansible construct no custom objects"))
            if isinstance(event, yaml.AliasEvent):
                size = anchors.get(event.anchor, 1)
                close(size, None)
            elif isinstance(event, yaml.ScalarEvent):
                key_seen(event)
                close(1, event.anchor)
            elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                is_map = isinstance(event, yaml.MappingStartEvent)
                stack.append([event.anchor, 1, set() if is_map else None, True, "" if is_map else 0])
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                anchor, size, *_ = stack.pop()
                close(size, anchor)
            else:
                continue
            if total + sum(f[1] for f in stack[-1:]) > MAX_NODES or (stack and stack[-1][1] > MAX_NODES):
                line, col = mark(event)
                problems.append(_problem(display, line, col,
                                         f"YAML aliases that expand to more than {MAX_NODES} values",
                                         "an inventory whose aliases (*name) expand to a bounded size",
                                         "write the values out, or use group vars instead of nested aliases"))
                break
    except yaml.MarkedYAMLError as exc:
        m = exc.problem_mark or exc.context_mark
        line, col = (m.line + 1, m.column + 1) if m else (1, 1)
        problems.append(_problem(display, line, col, f"invalid YAML ({printable(str(exc.problem))})",
                                 "well-formed YAML", "fix the syntax at this position"))
    except yaml.YAMLError as exc:
        problems.append(_problem(display, 1, 1, f"invalid YAML ({printable(str(exc))})",
                                 "well-formed YAML", "fix the syntax"))
    finally:
        parser.dispose()
    return problems


# --------------------------------------------------------------------------- Ansible


@dataclass
class _Ansible:
    DataLoader: Any
    InventoryManager: Any
    VariableManager: Any
    Origin: Any
    EncryptedString: Any
    AnsibleError: Any


_ANSIBLE: _Ansible | None = None


def _ansible() -> _Ansible:
    """Import ansible-core with flagops' settings: no ansible.cfg from the current directory,
    no plugin paths from the environment, only the builtin yaml and host_group_vars plugins."""
    global _ANSIBLE
    if _ANSIBLE is not None:
        return _ANSIBLE
    env = {"ANSIBLE_CONFIG": str(Path(__file__).with_name("loader.cfg")), **INVENTORY_ENV}
    dropped = ("ANSIBLE_INVENTORY_PLUGINS", "ANSIBLE_VARS_PLUGINS", "ANSIBLE_COLLECTIONS_PATH",
               "ANSIBLE_COLLECTIONS_PATHS")
    saved = {k: os.environ.get(k) for k in (*env, *dropped)}
    os.environ.update(env)
    for k in dropped:
        os.environ.pop(k, None)
    try:
        import ansible.constants as C  # noqa: N812
        from ansible._internal._datatag._tags import Origin
        from ansible.errors import AnsibleError
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader
        from ansible.parsing.vault import EncryptedString
        from ansible.vars.manager import VariableManager
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # Also when ansible.constants was imported before (tests, embedding): the same limits.
    C.INVENTORY_ENABLED = ["yaml"]
    C.VARIABLE_PLUGINS_ENABLED = ["host_group_vars"]
    C.INVENTORY_ANY_UNPARSED_IS_FAILED = True
    C.INVENTORY_UNPARSED_IS_FAILED = True
    _ANSIBLE = _Ansible(DataLoader, InventoryManager, VariableManager, Origin, EncryptedString, AnsibleError)
    return _ANSIBLE


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Ansible's warnings go to stderr; flagops reports problems itself."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        yield buf


# --------------------------------------------------------------------------- Doc


@dataclass
class Doc:
    """A YAML document with the origin of every value and mapping key.

    ``values``/``keys`` map a JSON pointer *in data* to where it came from, which for a
    merged release may be another file (the inventory that overrode it).
    """

    file: str
    data: Any
    values: dict[str, Location] = field(default_factory=dict)
    keys: dict[str, Location] = field(default_factory=dict)
    # Pointers an override removed (null, or a mapping replaced by a scalar).
    deleted: set[str] = field(default_factory=set)

    def where(self, pointer: str, *, key: bool = False) -> Location:
        if key and pointer in self.keys:
            return self.keys[pointer]
        p = pointer
        while True:
            if p in self.values:
                loc = self.values[p]
                return Location(loc.file, loc.line, loc.col, loc.pointer + pointer[len(p):])
            if not p:
                return Location(self.file, 1, 1, pointer)
            p = p.rsplit("/", 1)[0]


class _Displays:
    """Origin paths (absolute) -> the names messages use (as the user typed them)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def add(self, path: Path, display: str) -> None:
        self.names[str(path.resolve())] = display
        self.names[str(path)] = display

    def __call__(self, path: str) -> str:
        if path in self.names:
            return self.names[path]
        rel = os.path.relpath(path)
        return path if rel.startswith("..") else rel


def plain(value: Any, a: _Ansible, pointer: str, file: str, names: _Displays,
          values: dict[str, Location] | None = None, keys: dict[str, Location] | None = None,
          parent: Location | None = None) -> Any:
    """Ansible's tagged data -> plain Python (vault values become :class:`Vault`), recording
    each pointer's origin in ``values``/``keys`` when given."""
    origin = a.Origin.get_tag(value)
    loc = (Location(names(origin.path), origin.line_num or 1, origin.col_num or 1, pointer)
           if origin and origin.path else parent or Location(file, 1, 1, pointer))
    if values is not None:
        values[pointer] = loc
    if isinstance(value, a.EncryptedString):
        return Vault("")
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            kp = join_pointer(pointer, str(k))
            ko = a.Origin.get_tag(k)
            kloc = Location(names(ko.path), ko.line_num or 1, ko.col_num or 1, kp) if ko and ko.path else loc
            if keys is not None:
                keys[kp] = kloc
            # A bool or null carries no tag: its key's position is the best there is.
            out[str(k)] = plain(v, a, kp, file, names, values, keys, kloc)
        return out
    if isinstance(value, list | tuple):
        return [plain(v, a, join_pointer(pointer, i), file, names, values, keys, loc) for i, v in enumerate(value)]
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return base(value)
    return value


def load_doc(path: Path, display: str, names: _Displays | None = None) -> tuple[Doc, list[Problem]]:
    """Pre-scan, then load ``path`` with Ansible's DataLoader into a :class:`Doc`."""
    doc = Doc(display, None)
    problems = prescan(path, display)
    if problems:
        return doc, problems
    a = _ansible()
    names = names or _Displays()
    names.add(path, display)
    try:
        with _quiet():
            data = a.DataLoader().load_from_file(str(path), cache="none", trusted_as_template=True)
    except a.AnsibleError as exc:
        return doc, [_ansible_problem(exc, a, display, names)]
    doc.data = plain(data, a, "", display, names, doc.values, doc.keys)
    return doc, []


def _ansible_problem(exc: Exception, a: _Ansible, display: str, names: _Displays) -> Problem:
    """An Ansible error as a Problem at the deepest position it names."""
    loc = Location(display, 1, 1, "")
    messages = []
    e: BaseException | None = exc
    while e is not None:
        origin = a.Origin.get_tag(getattr(e, "obj", None))
        if origin and origin.path:
            loc = Location(names(origin.path), origin.line_num or 1, origin.col_num or 1, "")
        msg = getattr(e, "message", None) or str(e)
        messages.append(str(msg).splitlines()[0] if str(msg) else type(e).__name__)
        e = e.__cause__
    found = "; ".join(dict.fromkeys(m for m in messages if m))
    return Problem(loc, printable(found), "an inventory that Ansible can parse",
                   "fix what Ansible names at this position")


# --------------------------------------------------------------------------- inventory


@dataclass
class Inventory:
    """What Ansible makes of an inventory: groups -> host names (direct and inherited),
    each host's variables as the playbooks see them, and where every value came from."""

    doc: Doc  # the inventory file itself
    groups: dict[str, list[str]]  # group -> every host in it or its children, in order
    hosts: dict[str, Doc]  # host -> its variables as the playbooks see them, with origins
    host_locations: dict[str, Location]  # host -> where it is first listed
    group_locations: dict[str, Location]
    files: list[str] = field(default_factory=list)  # every file read, as displayed


def _var_files(inventory: Path) -> Iterator[Path]:
    """The files ansible.builtin.host_group_vars may read for ``inventory``."""
    count = 0
    for sub in ("group_vars", "host_vars"):
        base = inventory.parent / sub
        if not base.is_dir():
            continue
        for root, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or name.endswith("~"):
                    continue
                if Path(name).suffix not in VAR_FILE_SUFFIXES:
                    continue
                count += 1
                if count > MAX_VAR_FILES:
                    return
                yield Path(root) / name


def load_inventory(path: Path, display: str) -> tuple[Inventory | None, list[Problem]]:
    """Parse ``path`` as Ansible does. Returns (inventory or None, problems)."""
    names = _Displays()
    doc, problems = load_doc(path, display, names)
    if problems:
        return None, problems
    # Positions inside each file -> the JSON pointer of that value in its file.
    index: dict[tuple[bool, str, int, int], str] = {}
    var_docs = [doc]
    for var_file in _var_files(path):
        rel = os.path.relpath(var_file, path.parent)
        shown = str(Path(display).parent / rel) if Path(display).parent != Path(".") else rel
        var_doc, var_problems = load_doc(var_file, shown, names)
        problems += var_problems
        var_docs.append(var_doc)
    if problems:
        return None, problems
    for d in var_docs:
        for is_key, table in ((True, d.keys), (False, d.values)):
            for pointer, loc in table.items():
                index.setdefault((is_key, loc.file, loc.line, loc.col), pointer)

    def in_file(loc: Location, key: bool = False) -> Location:
        pointer = index.get((key, loc.file, loc.line, loc.col))
        return Location(loc.file, loc.line, loc.col, pointer) if pointer is not None else loc
    a = _ansible()
    loader = a.DataLoader()
    try:
        with _quiet():
            inv = a.InventoryManager(loader=loader, sources=[str(path.resolve())])
            vm = a.VariableManager(loader=loader, inventory=inv)
            hosts = list(inv.hosts.values())
            resolved = {h.name: vm.get_vars(host=h, include_hostvars=False)
                        for h in hosts}
    except a.AnsibleError as exc:
        return None, [_ansible_problem(exc, a, display, names)]

    groups = {name: [h.name for h in g.get_hosts()] for name, g in inv.groups.items()}
    host_docs: dict[str, Doc] = {}
    host_locations: dict[str, Location] = {}
    for h in hosts:
        origin = a.Origin.get_tag(h.name)
        where = (Location(names(origin.path), origin.line_num or 1, origin.col_num or 1, "")
                 if origin and origin.path else Location(display, 1, 1, ""))
        host_locations[h.name] = in_file(where, key=True)
        values: dict[str, Location] = {}
        keys: dict[str, Location] = {}
        raw = {k: v for k, v in resolved[h.name].items() if k not in MAGIC_VARS}
        data = plain(raw, a, "", display, names, values, keys, where)
        hdoc = Doc(display, data, {p: in_file(loc, key=loc == keys.get(p)) for p, loc in values.items()},
                   {p: in_file(loc, key=True) for p, loc in keys.items()})
        hdoc.values[""] = host_locations[h.name]
        host_docs[h.name] = hdoc
    group_locations = {}
    for name, g in inv.groups.items():
        origin = a.Origin.get_tag(g.name)
        group_locations[name] = in_file(
            Location(names(origin.path), origin.line_num or 1, origin.col_num or 1, "")
            if origin and origin.path else Location(display, 1, 1, ""), key=True)
    return Inventory(doc, groups, host_docs, host_locations, group_locations,
                     sorted(set(names.names.values()))), []
