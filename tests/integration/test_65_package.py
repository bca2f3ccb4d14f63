"""flagops as a package, as an operator installs it: no checkout anywhere in sight.

1. The wheel built from this tree, installed into a fresh venv, run from an empty
   directory: validate, render, lab up, provision, deploy, verify against the lab.
2. The roles as the collection flagops.flagos: the tarball `ansible-galaxy collection
   build` makes, installed with `ansible-galaxy collection install`, and one role run from
   a plain playbook with plain `ansible-playbook` against the lab.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from flagops import resources

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, \
        f"{' '.join(argv)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(the venv's flagops, an empty working directory, the environment)."""
    root = tmp_path_factory.mktemp("pkg")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["FLAGOPS_HOME"] = str(lab.paths.root.parent)  # the lab's home: its state and collections
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(root / "dist")], root, env)
    wheel = next((root / "dist").glob("flagops-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], root, env)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], root, env)
    work = root / "work"
    work.mkdir()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return venv / "bin" / "flagops", work, env


def test_wheel_runs_the_quick_start_outside_any_checkout(installed: tuple[Path, Path, dict[str, str]]) -> None:
    flagops, work, env = installed
    # The installed package, not this checkout, answers.
    where = _run([str(flagops.parent / "python"), "-c", "import flagops, sys; print(flagops.__file__)"], work, env)
    assert str(REPO) not in where.stdout and "site-packages" in where.stdout

    up = json.loads(_run([str(flagops), "lab", "up", "--json"], work, env).stdout)
    inventory = up["inventory"]
    assert Path(inventory).is_file() and str(REPO) not in inventory

    val = _run([str(flagops), "validate", inventory], work, env)
    assert "ok - release ernie45, 2 hosts" in val.stdout
    rendered = _run([str(flagops), "render", "ernie45", "-i", inventory, "-o", str(work / "out")], work, env)
    assert (work / "out" / "hostfile.txt").is_file(), rendered.stdout

    prov = _run([str(flagops), "provision", inventory, "--json"], work, env)
    res = next(json.loads(ln) for ln in reversed(prov.stdout.splitlines()) if '"flagops_result"' in ln)
    assert res["ok"] and {h: r["changed"] for h, r in res["recap"].items()} == {"node1": 0, "node2": 0}

    _run([str(flagops), "deploy", "ernie45", "-i", inventory], work, env)
    verify = json.loads(_run([str(flagops), "verify", "--json"], work, env).stdout.splitlines()[-1])
    assert verify["ok"], verify
    assert not any(p.name not in ("out",) for p in work.iterdir()), "flagops wrote into the working directory"


def test_collection_tarball_installs_and_a_role_runs_from_a_plain_playbook(
        lab: Lab, tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    _run(["ansible-galaxy", "collection", "build", "--force", "--output-path", str(tmp_path), str(REPO)],
         tmp_path, env)
    tarball = next(tmp_path.glob("flagops-flagos-*.tar.gz"))
    with tarfile.open(tarball) as tar:
        tops = {m.name.split("/")[0] for m in tar.getmembers()}
        roles = {m.name.split("/")[1] for m in tar.getmembers() if m.name.startswith("roles/") and "/" in m.name[6:]}
    assert tops == {"MANIFEST.json", "FILES.json", "README.md", "CHANGELOG.md", "meta", "plugins", "roles"}, tops
    assert {"preflight", "weights", "serve"} <= roles

    coll = tmp_path / "collections"
    deps = str(resources.collections_dir())
    env.update(ANSIBLE_COLLECTIONS_PATH=f"{coll}{os.pathsep}{deps}")
    _run(["ansible-galaxy", "collection", "install", "--offline", "-p", str(coll), str(tarball)], tmp_path, env)
    assert (coll / "ansible_collections" / "flagops" / "flagos" / "roles" / "preflight").is_dir()

    play = tmp_path / "site.yml"
    play.write_text(
        "- name: An operator's own playbook, using the flagops collection\n"
        "  hosts: all\n"
        "  gather_facts: false\n"
        "  roles:\n"
        "    - role: flagops.flagos.preflight\n"
        "      vars:\n"
        "        preflight_slot_type: cpu\n"
        "        preflight_slots: 1\n"
        "        preflight_min_driver: ''\n"
        "        preflight_min_docker: '20.10'\n"
    )
    empty_roles = tmp_path / "no-roles"
    empty_roles.mkdir()
    # No flagops config (an empty one: ansible-core refuses /dev/null), no roles path: the role
    # can only come from the installed tarball.
    cfg = tmp_path / "ansible.cfg"
    cfg.write_text("[defaults]\n")
    env.update(ANSIBLE_ROLES_PATH=str(empty_roles), ANSIBLE_CONFIG=str(cfg), ANSIBLE_HOST_KEY_CHECKING="True",
               ANSIBLE_NOCOLOR="1")
    done = _run(["ansible-playbook", "-i", str(lab.paths.root / "inventory.yaml"), str(play)], tmp_path, env)
    recap = done.stdout[done.stdout.index("PLAY RECAP"):]
    for node in ("node1", "node2"):
        assert f"{node}" in recap
    assert "failed=0" in recap and "unreachable=0" in recap and "failed=1" not in recap, recap
