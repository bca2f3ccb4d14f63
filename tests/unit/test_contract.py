"""One contract between Python and YAML: what both sides use is computed once, in
flagops.render.contract, and reaches the playbooks as ``flagops.contract``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from flagops import config, render

REPO = Path(__file__).resolve().parents[2]

# Each literal the contract owns. A role's defaults/ and argument_specs may repeat one
# as the standalone default (a role stays usable alone); the tasks and the playbooks,
# where the flagops run takes its values, may not.
OWNED = {
    "owner_label": "io.flagops.managed",
    "ray_dashboard_port": "8265",
    "serve_log": "host_0_localhost",
    "state_file": ".flagops/service",
    "container_repo_dir": "/repos/FlagScale",
}


def _task_and_playbook_files() -> list[Path]:
    files = sorted((REPO / "playbooks").rglob("*.yml"))
    for role in sorted((REPO / "roles").iterdir()):
        files += sorted((role / "tasks").rglob("*.yml")) + sorted((role / "handlers").rglob("*.yml"))
    return files


@pytest.mark.parametrize("key", sorted(OWNED))
def test_no_contract_literal_is_written_twice(key: str) -> None:
    literal = OWNED[key]
    hits = []
    for path in _task_and_playbook_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split(" #", 1)[0]
            if literal in code and not code.lstrip().startswith("#"):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert hits == [], f"{literal!r} belongs to flagops.contract.{key}; read it from there"


def test_the_playbooks_read_every_shared_name_from_the_contract() -> None:
    mapping = yaml.safe_load((REPO / "playbooks" / "vars" / "flagops.yml").read_text())
    for var in ("fo_share", "fo_container", "fo_model_dir", "fo_repo_dir", "fo_conf_dir", "fo_state_file",
                "serve_workdir", "serve_log_file", "serve_pid_file", "serve_expected_nodes",
                "serve_ray_dashboard_port"):
        assert re.fullmatch(r"\{\{ fo_c\.\w+ \}\}", mapping[var]), (var, mapping[var])
    keys = {re.fullmatch(r"\{\{ fo_c\.(\w+) \}\}", v).group(1) for v in mapping.values()
            if isinstance(v, str) and re.fullmatch(r"\{\{ fo_c\.(\w+) \}\}", v)}
    cfg = config.load(REPO / "inventories" / "lab.yaml")
    assert keys <= set(render.contract(cfg)), keys - set(render.contract(cfg))


def test_python_reads_the_same_values() -> None:
    from flagops import service

    cfg = config.load(REPO / "inventories" / "lab.yaml")
    c = render.contract(cfg)
    assert service.state_file(cfg) == c["state_file"] == "/share/.flagops/service/ernie45.json"
    assert service.serve_log(cfg) == c["serve_log"]
    assert c["serve_log"].endswith("/outputs/ernie45_300b/serve_logs/host_0_localhost.output")
    assert service.endpoint(cfg) == f"http://172.30.0.11:{c['api_port']}"
    assert service.expected_resource(cfg) == c["ray_resource"] == "CPU" and c["ray_nodes"] == 2
