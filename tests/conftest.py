"""Shared fixtures: repo paths and an isolated $FLAGOPS_HOME for every test."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def flagops_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the developer's ~/.flagops from tests."""
    home = tmp_path / "flagops-home"
    monkeypatch.setenv("FLAGOPS_HOME", str(home))
    monkeypatch.delenv("FLAGOPS_CATALOG", raising=False)
    return home


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run with the repo root as CWD (messages show repo-relative paths)."""
    monkeypatch.chdir(REPO)
    return REPO
