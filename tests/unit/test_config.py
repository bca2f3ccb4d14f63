"""Inventory resolution, override merging and the catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from flagops import config
from flagops.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

INV = """\
all:
  vars:
    flagops_release: ernie45
    flagops_share_root: /share/
    flagops_container_name: flagos
    flagops_slots: 4
    ansible_port: 22
{extra_all}  children:
    gpus:
      vars:
        flagops_slots: 8
      children:
        master:
          hosts:
            node1: {{ansible_host: 10.0.0.1}}
        workers:
          vars:
            ansible_port: 2200
          hosts:
            node2: {{ansible_host: 10.0.0.2, flagops_nic: eth1}}
"""


def _write(tmp_path: Path, extra_all: str = "") -> Path:
    path = tmp_path / "inv.yaml"
    path.write_text(INV.format(extra_all=extra_all))
    return path


def test_a800_resolves() -> None:
    cfg = config.load(REPO / "inventories/a800.yaml")
    assert [(h.name, h.address, h.role, h.slots, h.port, h.nic) for h in cfg.hosts] == [
        ("node1", "192.0.2.10", "master", 8, 22, "bond0"),
        ("node2", "192.0.2.11", "worker", 8, 22, "bond0"),
    ]
    assert (cfg.share_root, cfg.container_name, cfg.slot_type, cfg.ssh_port) == ("/share", "flagos", "gpu", 22)
    assert cfg.release["flagscale"]["commit"] == "230dc1d879d8c2af1e449fc29b0cd1867e07c0c3"
    assert cfg.release["image"]["ref"].endswith("flagrelease:flagrelease_nv_ernie_rank0")


def test_group_precedence_all_lt_parent_lt_child_lt_host(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path))
    # flagops_slots: all=4 < gpus=8; ansible_port: all=22 < workers=2200
    assert [h.slots for h in cfg.hosts] == [8, 8]
    assert [h.port for h in cfg.hosts] == [22, 2200]
    assert cfg.ssh_port == 2200
    assert cfg.share_root == "/share"
    assert cfg.hosts[1].nic == "eth1" and cfg.hosts[0].nic is None


def test_overrides_deep_merge_and_null_delete(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, (
        "    flagops_release_overrides:\n"
        "      image: {ref: 172.30.0.1:5000/flagrelease/flagrelease:lab}\n"
        "      runner:\n"
        "        envs: {USE_FLAGGEMS: false, CUDA_VISIBLE_DEVICES: null}\n"
        "      serve:\n"
        "        engine_args: {max_model_len: 4096}\n"
        "        profile: null\n"
    )))
    rel = cfg.release
    assert rel["image"]["ref"] == "172.30.0.1:5000/flagrelease/flagrelease:lab"
    assert rel["runner"]["envs"] == {"CUDA_DEVICE_MAX_CONNECTIONS": 1, "USE_FLAGGEMS": False,
                                     "RAY_CGRAPH_get_timeout": 60}
    assert rel["serve"]["engine_args"]["max_model_len"] == 4096
    assert rel["serve"]["engine_args"]["port"] == 30000  # untouched sibling kept
    assert "profile" not in rel["serve"]
    # the catalog file itself is not modified by a merge
    assert config.load(REPO / "inventories/a800.yaml").release["serve"]["engine_args"]["max_model_len"] == 128000


def test_catalog_env_adds_and_shadows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cat = tmp_path / "cat"
    cat.mkdir()
    text = (REPO / "flagops/releases/ernie45.yaml").read_text().replace("name: ernie45", "name: mine")
    (cat / "mine.yaml").write_text(text)
    monkeypatch.setenv("FLAGOPS_CATALOG", f"{tmp_path / 'missing'}:{cat}")
    assert config.list_releases()["mine"] == cat / "mine.yaml"
    assert "ernie45" in config.list_releases()
    assert config.load(REPO / "inventories/a800.yaml", "mine").release_name == "mine"


def test_vault_and_env_lookup_credentials_accepted(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, (
        "    flagops_registry_password: !vault |\n"
        "      $ANSIBLE_VAULT;1.1;AES256\n"
        "      6162636465\n"
        "    flagops_hub_token: \"{{ lookup('env', 'MODELSCOPE_API_TOKEN') }}\"\n"
    )))
    assert cfg.release_name == "ernie45"


def test_before_start_allow_list() -> None:
    ok = ["source /root/miniconda3/bin/activate flagscale-inference",
          "source /opt/venvs/x/bin/activate",
          "conda activate fs && export GLOO_SOCKET_IFNAME=bond0",
          "cd /repos/FlagScale && source /opt/v/bin/activate"]
    bad = ["source ~/x/bin/activate", "conda activate fs; id", "export A=$(id)",
           "source /x/bin/activate env | tee", "pip install x", "cd ../x"]
    assert [config._check_command(c) for c in ok] == [None] * len(ok)
    assert all(config._check_command(c) for c in bad)


def test_error_is_one_exception_with_all_problems(tmp_path: Path) -> None:
    path = _write(tmp_path).read_text().replace("flagops_container_name: flagos",
                                                "flagops_container_name: 'x y'")
    inv = tmp_path / "two.yaml"
    inv.write_text(path.replace("ansible_host: 10.0.0.2", "ansible_host: 10.0.0.1"))
    with pytest.raises(ConfigError) as exc:
        config.load(inv)
    assert len(exc.value.problems) == 2
    assert exc.value.summary().endswith("2 problems found")
