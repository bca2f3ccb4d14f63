"""vllm_build's proof, run by the Python that serves with the built vLLM (stdin of `python -`).

Args: <FlagScale checkout> <pinned version>. Prints one JSON object:
  version      the installed vllm distribution's version (base must equal the pin)
  archs        FlagScale's registry additions (the '+    "Arch": (' lines of its registry patch)
               that the installed ModelRegistry lacks (must be empty)
  unexplained  installed files of the vllm package that differ from the pristine submodule
               commit (or are new) although no patch names them (must be empty)
  unapplied    files the patches name that the installed package has as pristine (must be empty)
  not_built    patched files whose installed bytes differ from the unpatched+patched tree
The pristine commit is third_party/vllm's HEAD in the checkout (its objects are on shared storage).
"""

import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys

src, pin = sys.argv[1], sys.argv[2]
sub = os.path.join(src, "third_party", "vllm")
patches = os.path.join(src, "flagscale", "backends", "vllm")

named, added = set(), []
for root, _, files in os.walk(patches):
    for name in sorted(files):
        if not name.endswith(".patch"):
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


tree = subprocess.run(
    ["git", "-C", sub, "ls-tree", "-r", "HEAD", "vllm/"], check=True, capture_output=True, text=True
).stdout
pristine = {}
for line in tree.splitlines():
    meta, path = line.split("\t", 1)
    pristine[path] = meta.split()[2]

import vllm  # noqa: E402 - after the git read: an import failure should not hide the tree

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
not_built = sorted(
    n
    for n in in_pkg & differs
    if os.path.exists(os.path.join(sub, n)) and blob(os.path.join(sub, n)) != blob(os.path.join(pkg, n[5:]))
)

from vllm.model_executor.models.registry import ModelRegistry  # noqa: E402

have = set(ModelRegistry.get_supported_archs())
version = importlib.metadata.version("vllm")
print(
    json.dumps(
        {
            "version": version,
            "version_ok": version.split("+")[0] == pin,
            "location": pkg,
            "registry_additions": added,
            "archs": sorted(a for a in added if a not in have),
            "patched_files": len(in_pkg),
            "unexplained": sorted(differs - in_pkg),
            "unapplied": sorted(in_pkg - differs),
            "not_built": not_built,
        },
        sort_keys=True,
    )
)
