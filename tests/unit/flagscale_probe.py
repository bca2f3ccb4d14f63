"""Run inside a subprocess with the flag-scale 0.8.0 wheel on sys.path (see
test_render_flagscale.py). Reads a rendered conf dir exactly the way FlagScale does and
prints what it got as JSON. Not collected by pytest (no test_ prefix)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from flagscale.runner.utils import parse_hostfile
from flagscale.utils import flatten_dict_to_args
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf


def read(conf_dir: str) -> dict:
    with initialize_config_dir(config_dir=os.path.abspath(conf_dir), version_base=None):
        cfg = compose(config_name="serve", return_hydra_config=True)
    hydra_run_dir = OmegaConf.select(cfg, "hydra.run.dir")
    cfg_dict = OmegaConf.to_container(cfg, resolve=False)
    cfg_dict.pop("hydra")
    cfg_no_hydra = OmegaConf.create(cfg_dict)
    resolved = OmegaConf.to_container(cfg_no_hydra, resolve=True)

    # runner_serve.py::SSHServeRunner._prepare: a relative hostfile is joined with the CWD.
    hostfile = cfg.experiment.runner.get("hostfile", None)
    path = hostfile if os.path.isabs(hostfile) else os.path.join(os.getcwd(), hostfile)
    resources = parse_hostfile(path)

    # run_inference_engine.py::vllm_serve: engine_args laid over engine_args_specific.vllm.
    entry = resolved["serve"][0]
    vllm_args = dict(entry.get("engine_args_specific", {}).get("vllm", {}))
    vllm_args.update(entry.get("engine_args", {}))
    command = ["vllm", "serve", vllm_args["model"], *flatten_dict_to_args(vllm_args, ["model"])]

    # runner_serve.py::_generate_run_script_serve: `export K=V` joined by ' && '.
    envs = resolved["experiment"].get("envs", {})
    exports = " && ".join(f"export {k}={v}" for k, v in envs.items() if k != "nodes_envs")
    return {
        "run_script": run_script(resolved, resources),
        "config": resolved,
        "hydra_run_dir": OmegaConf.to_container(OmegaConf.create({"d": hydra_run_dir}), resolve=True)["d"]
        if hydra_run_dir is not None else None,
        "hostfile_path": path,
        "hosts": [[host, info] for host, info in resources.items()],
        "vllm_command": command,
        "exports": exports,
        "false_flag": flatten_dict_to_args({"enforce_eager": False, "no_enable_prefix_caching": True}),
    }


def run_script(resolved: dict, resources: dict) -> str:
    """The master's host_0_localhost_run.sh, written by FlagScale's own generator from the
    config SSHServeRunner._prepare builds (nodes = the parsed hostfile); nothing is run."""
    from flagscale.runner.runner_serve import _generate_run_script_serve

    out = tempfile.mkdtemp(prefix="flagscale-probe-")
    config = OmegaConf.create(resolved)
    OmegaConf.set_struct(config, False)
    config.logging = {"log_dir": f"{out}/logs", "scripts_dir": f"{out}/scripts", "pids_dir": f"{out}/pids"}
    if resources:
        config["nodes"] = list(resources.items())
    path = _generate_run_script_serve(config, "localhost", 0, "python flagscale/serve/run_inference_engine.py")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps({name: read(path) for name, path in zip(sys.argv[1::2], sys.argv[2::2], strict=True)}))
