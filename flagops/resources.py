"""What flagops ships and what it installs for itself.

Shipped: the playbooks, roles, schemas, inventories and Ansible settings live at the
repository's root (``playbooks/``, ``roles/``, ``schemas/``, ``inventories/``,
``ansible.cfg``); the package reaches them through ``flagops/_data/`` (symbolic links in a
checkout, real copies in a built wheel), always through :mod:`importlib.resources`, so an
installed flagops works from any directory and never looks for a checkout.

Installed: the Ansible collections the roles use (``community.docker``, ``ansible.posix``
and the one community.docker depends on).
Galaxy is not always reachable, PyPI is: :func:`ensure_collections` takes them out of the
PyPI ``ansible`` bundle wheel (pinned, downloaded once with pip, so the user's pip index
settings and mirrors apply) into ``$FLAGOPS_HOME/collections``. ``flagops setup`` runs it;
every playbook run calls it first, so a fresh install needs no extra step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

from flagops import state
from flagops.errors import RunError

ANSIBLE_BUNDLE = "ansible==12.3.0"
# Collection -> the version the bundle above carries (checked after extraction);
# community.docker declares the inventory-filtering collection as its dependency.
COLLECTIONS = {"community.docker": "4.8.5", "ansible.posix": "2.1.0",
               "community.library_inventory_filtering_v1": "1.1.5"}


def data(*parts: str) -> Path:
    """A shipped file or directory: ``data("roles", "serve")``."""
    base = Path(str(resources.files("flagops") / "_data"))
    return base.joinpath(*parts)


def playbook(name: str) -> Path:
    return data("playbooks", f"{name}.yml")


def collections_dir() -> Path:
    """``$FLAGOPS_HOME/collections`` (the ``ansible_collections/`` tree lives below it)."""
    return state.home() / "collections"


def installed_collections(root: Path | None = None) -> dict[str, str]:
    """Collection name -> version found under ``root`` (default :func:`collections_dir`)."""
    root = root or collections_dir()
    found: dict[str, str] = {}
    for name in COLLECTIONS:
        ns, coll = name.split(".")
        manifest = root / "ansible_collections" / ns / coll / "MANIFEST.json"
        try:
            found[name] = json.loads(manifest.read_text(encoding="utf-8"))["collection_info"]["version"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _bundle_wheel(cache: Path, say: object) -> Path:
    version = ANSIBLE_BUNDLE.split("==")[1]
    found = sorted(cache.glob(f"ansible-{version}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    print_ = say if callable(say) else None
    if print_:
        print_(f"downloading {ANSIBLE_BUNDLE} (the Ansible collections bundle, ~50 MB) with pip")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
         "-d", str(cache), ANSIBLE_BUNDLE],
        capture_output=True, text=True,
    )
    found = sorted(cache.glob(f"ansible-{version}-*.whl"))
    if done.returncode != 0 or not found:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise RunError(
            f"could not download {ANSIBLE_BUNDLE} from the Python package index to install the Ansible "
            f"collections {', '.join(COLLECTIONS)}:\n{tail}\n"
            f"fix: make PyPI (or your pip index) reachable, or put the wheel into {cache}"
        )
    return found[0]


def ensure_collections(say: object = None) -> dict[str, str]:
    """Install the pinned collections into :func:`collections_dir` unless present.

    Idempotent and cheap when done (reads two MANIFEST.json). Extraction goes to a
    temporary directory first and is renamed into place, so an interrupted setup never
    leaves a half collection that a later run would trust. Returns name -> version.
    """
    root = collections_dir()
    have = installed_collections(root)
    missing = [n for n, v in COLLECTIONS.items() if have.get(n) != v]
    if not missing:
        return have
    whl = _bundle_wheel(state.home() / "cache" / "wheels", say)
    import shutil
    import tempfile

    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        for name in missing:
            ns, coll = name.split(".")
            prefix = f"ansible_collections/{ns}/{coll}/"
            members = [n for n in names if n.startswith(prefix)]
            if not members:
                raise RunError(f"{whl.name} holds no {name} collection")
            if callable(say):
                say(f"installing {name} from {whl.name} into {root}")
            dest = root / "ansible_collections" / ns / coll
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{coll}-") as tmp:
                z.extractall(tmp, members)
                if dest.exists():
                    shutil.rmtree(dest)  # an older or partial copy flagops itself installed
                Path(tmp, prefix).rename(dest)
    have = installed_collections(root)
    wrong = {n: have.get(n) for n in COLLECTIONS if have.get(n) != COLLECTIONS[n]}
    if wrong:
        raise RunError(f"collections after install: {wrong}, expected {COLLECTIONS}")
    return have
