"""Git plumbing for the repositories the lab serves (FlagScale.git, vllm.git): one fixed
identity and date, no user or system git config, so every commit is deterministic."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from flagops.lab import LabError

BRANCH = "main"
IDENTITY = {
    "GIT_AUTHOR_NAME": "flagops lab",
    "GIT_AUTHOR_EMAIL": "lab@flagops.invalid",
    "GIT_AUTHOR_DATE": "2025-07-07T00:00:00+00:00",
    "GIT_COMMITTER_NAME": "flagops lab",
    "GIT_COMMITTER_EMAIL": "lab@flagops.invalid",
    "GIT_COMMITTER_DATE": "2025-07-07T00:00:00+00:00",
}


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(IDENTITY, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, LC_ALL="C", TZ="UTC")
    return env


def _git(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env=_git_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _head_of(bare: Path) -> str | None:
    try:
        return _git("rev-parse", f"refs/heads/{BRANCH}", cwd=bare)
    except LabError:
        return None
