#!/usr/bin/env python3
"""FlagGems environment probe: is FlagGems really on in this container?

Usage: python3 flaggems_env.py [--expect-version V] [--raylet-pid PID|auto]
                               [--oplog PATH] [--no-oplog]

Items (each pass/fail/skip with a reason):
  import          ``import flag_gems`` works (its version is reported).
  version         equals --expect-version (skip when not given).
  enable_signature
                  ``inspect.signature(flag_gems.enable)`` binds the call the
                  installed vLLM really makes: its worker's source
                  (vllm/v1/worker/gpu_model_runner.py, or --caller PATH) is parsed
                  and the keywords of its ``flag_gems.enable(...)`` call are bound.
                  FlagScale 0.8.0's patch passes ``forward_only=True``, which only
                  FlagGems 2.2 (release_v1.0.0) accepts; with a newer FlagGems that
                  call raises TypeError, the worker logs "Falling back" and the
                  service silently runs on native torch: that is a FAIL. Where no
                  such caller is installed (a bare GPU host), the call FlagScale's
                  current patch makes (record, unused, path) is bound, and the
                  result says whether forward_only would be accepted too.
  env_process     USE_FLAGGEMS is 1/true/yes in this process's environment.
  env_raylet      ... and in /proc/<pid>/environ of the raylet (Ray workers
                  inherit the raylet's environment); ``auto`` finds the raylet.
  oplog           the op-list log the workers write exists and is not empty.

Overall: skip when torch or a GPU is missing (``import flag_gems`` raises
"No device were detected" on CPU-only machines); else fail when any item fails;
else pass. One JSON document on stdout, exit code 0.
"""

import argparse
import contextlib
import inspect
import json
import os
import sys
import traceback

PROBE = "flaggems_env"
# FlagScale's patched gpu_model_runner: 0.8.0 passes forward_only=True too.
BASE_ENABLE_KWARGS = {
    "record": True,
    "unused": ["exponential_", "softmax"],
    "path": "/tmp/gems_oplist.log.txt",
}
CALLER_FILES = ("v1/worker/gpu_model_runner.py", "worker/model_runner.py", "v1/worker/gpu_worker.py")
DEFAULT_OPLOG = "/tmp/gems_oplist.log.txt"
TRUTHY = ("1", "true", "yes")


def item(name, status, reason, **values):
    return {"name": name, "status": status, "reason": reason, "values": values}


def env_truthy(value):
    return value is not None and value.strip().lower() in TRUTHY


def read_environ(pid):
    with open("/proc/%d/environ" % pid, "rb") as fh:
        raw = fh.read()
    env = {}
    for chunk in raw.split(b"\0"):
        if b"=" in chunk:
            k, _, v = chunk.partition(b"=")
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def find_raylet():
    """pids whose argv[0] ends in 'raylet' (Ray's per-node daemon)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv0 = fh.read().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if os.path.basename(argv0) == "raylet":
            pids.append(int(entry))
    return sorted(pids)


def check_import():
    """(item, module or None, skip_reason or None)"""
    try:
        import torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return (item("import", "skip", f"torch not importable: {type(exc).__name__}: {exc}"),
                None, "torch not importable")
    try:
        # flag_gems prints while importing; keep stdout for our JSON.
        with contextlib.redirect_stdout(sys.stderr):
            import flag_gems
    except RuntimeError as exc:
        msg = str(exc)
        if "no device" in msg.lower():
            reason = f"flag_gems cannot load without a GPU: RuntimeError: {msg.strip()}"
            return item("import", "skip", reason), None, reason
        return (item("import", "fail", f"import flag_gems raised RuntimeError: {msg}",
                     traceback=traceback.format_exc(limit=-3)), None, None)
    except Exception as exc:  # noqa: BLE001
        return (item("import", "fail", f"flag_gems not importable: {type(exc).__name__}: {exc}",
                     traceback=traceback.format_exc(limit=-3)), None, None)
    version = getattr(flag_gems, "__version__", None)
    return (item("import", "pass", f"flag_gems {version} imported", version=version,
                 file=getattr(flag_gems, "__file__", None)), flag_gems, None)


def find_enable_calls(path):
    """[(line, [keyword names], positional count)] of ``<...gems...>.enable(...)`` calls."""
    import ast
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            tree = ast.parse(fh.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return []
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "enable":
            owner = ast.unparse(node.func.value) if hasattr(ast, "unparse") else ""
            if "gems" in owner.lower():
                calls.append((node.lineno, [k.arg for k in node.keywords if k.arg], len(node.args)))
    return calls


def find_caller(spec):
    """(path, line, kwargs names, nargs) of the vLLM worker's flag_gems.enable call, or None."""
    if spec == "none":
        return None
    paths = []
    if spec and spec != "auto":
        paths = [spec]
    else:
        import importlib.util
        try:
            found = importlib.util.find_spec("vllm")
        except (ImportError, ValueError):
            found = None
        roots = list(found.submodule_search_locations or []) if found else []
        paths = [os.path.join(r, f) for r in roots for f in CALLER_FILES]
    for path in paths:
        if os.path.isfile(path):
            for line, kws, nargs in find_enable_calls(path):
                return path, line, kws, nargs
    return None


def check_signature(fg, caller_spec="auto"):
    enable = getattr(fg, "enable", None)
    if enable is None:
        return item("enable_signature", "fail", "flag_gems has no enable()")
    try:
        sig = inspect.signature(enable)
    except (TypeError, ValueError) as exc:
        return item("enable_signature", "fail", f"cannot inspect flag_gems.enable: {exc}")
    params = list(sig.parameters)
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    forward_only = "forward_only" in sig.parameters or takes_kwargs
    caller = find_caller(caller_spec)
    if caller is not None:
        path, line, kws, nargs = caller
        where = f"{path}:{line}"
        try:
            sig.bind(*([None] * nargs), **{k: None for k in kws})
        except TypeError as exc:
            return item(
                "enable_signature", "fail",
                f"flag_gems.enable{sig} rejects the call at {where} ({exc}): the worker "
                "falls back to native torch silently",
                signature=str(sig), parameters=params, forward_only=forward_only, caller=where,
                caller_keywords=kws)
        return item("enable_signature", "pass", f"flag_gems.enable takes the call at {where} "
                    f"({', '.join(kws) or 'no keywords'})", signature=str(sig), parameters=params,
                    forward_only=forward_only, caller=where, caller_keywords=kws)
    try:
        sig.bind(**BASE_ENABLE_KWARGS)
    except TypeError as exc:
        return item("enable_signature", "fail",
                    f"flag_gems.enable{sig} rejects enable(record=, unused=, path=) ({exc})",
                    signature=str(sig), parameters=params, forward_only=forward_only, caller=None)
    note = "accepts forward_only too" if forward_only else \
        "has no forward_only: a FlagScale 0.8.0 worker, which passes it, would fall back to native torch"
    return item("enable_signature", "pass",
                f"no vLLM worker source found here; flag_gems.enable takes record/unused/path and {note}",
                signature=str(sig), parameters=params, forward_only=forward_only, caller=None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--expect-version", default=None)
    ap.add_argument("--raylet-pid", default=None, help="pid or 'auto'")
    ap.add_argument("--oplog", default=DEFAULT_OPLOG)
    ap.add_argument("--no-oplog", action="store_true", help="do not check the op-list log")
    ap.add_argument("--caller", default="auto",
                    help="the vLLM source whose flag_gems.enable(...) call is bound: auto (the "
                         "installed vllm's worker), none, or a path")
    args = ap.parse_args(argv)

    items = []
    imp, fg, skip_reason = check_import()
    items.append(imp)
    version = imp["values"].get("version")

    if args.expect_version is None:
        items.append(item("version", "skip", "no --expect-version given", version=version))
    elif fg is None:
        items.append(item("version", "skip", "flag_gems not imported", expected=args.expect_version))
    elif version == args.expect_version:
        items.append(item("version", "pass", f"flag_gems {version} as pinned", version=version))
    else:
        items.append(item("version", "fail", f"flag_gems {version}, release pins {args.expect_version}",
                          version=version, expected=args.expect_version))

    if fg is None:
        items.append(item("enable_signature", "skip", "flag_gems not imported"))
    else:
        items.append(check_signature(fg, args.caller))

    val = os.environ.get("USE_FLAGGEMS")
    items.append(item("env_process", "pass" if env_truthy(val) else "fail",
                      f"USE_FLAGGEMS={val!r} in this process", USE_FLAGGEMS=val))

    if args.raylet_pid is None:
        items.append(item("env_raylet", "skip", "no --raylet-pid given"))
    else:
        pids = find_raylet() if args.raylet_pid == "auto" else [int(args.raylet_pid)]
        if not pids:
            items.append(item("env_raylet", "fail", "no raylet process found"))
        for pid in pids:
            try:
                rval = read_environ(pid).get("USE_FLAGGEMS")
            except OSError as exc:
                items.append(item("env_raylet", "fail", "cannot read /proc/%d/environ: %s" % (pid, exc), pid=pid))
                continue
            items.append(item("env_raylet", "pass" if env_truthy(rval) else "fail",
                              "USE_FLAGGEMS=%r in raylet pid %d (Ray workers inherit it)" % (rval, pid),
                              pid=pid, USE_FLAGGEMS=rval))

    if args.no_oplog:
        items.append(item("oplog", "skip", "--no-oplog"))
    else:
        path = args.oplog
        try:
            size = os.path.getsize(path)
        except OSError:
            items.append(item("oplog", "fail", f"{path} missing: no worker enabled FlagGems with record=True",
                              path=path))
        else:
            lines, ops = 0, set()
            with open(path, errors="replace") as fh:
                for line in fh:
                    lines += 1
                    if "GEMS" in line and len(ops) < 1000:
                        ops.add(line.split("GEMS", 1)[1].strip().split(",")[0][:60])
            status = "pass" if size > 0 and lines > 0 else "fail"
            items.append(item("oplog", status, "%s: %d bytes, %d lines, %d distinct GEMS ops"
                              % (path, size, lines, len(ops)),
                              path=path, bytes=size, lines=lines, distinct_ops=len(ops),
                              sample_ops=sorted(ops)[:20]))

    failed = [i["name"] for i in items if i["status"] == "fail"]
    values = {"flag_gems_version": version,
              "forward_only": next((i["values"].get("forward_only") for i in items
                                    if i["name"] == "enable_signature"), None)}
    if skip_reason:
        status, reason = "skip", skip_reason
    elif failed:
        status = "fail"
        reason = "; ".join(i["reason"] for i in items if i["status"] == "fail")
    else:
        status, reason = "pass", f"flag_gems {version} importable, enable() takes the worker's call, USE_FLAGGEMS set"
    doc = {"probe": PROBE, "status": status, "reason": reason, "values": values, "items": items}
    sys.stdout.write(json.dumps(doc, sort_keys=True, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
