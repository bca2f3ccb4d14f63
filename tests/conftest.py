"""Shared fixtures: repo paths and an isolated $FLAGOPS_HOME for every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "contract: reads our output with third-party code fetched from PyPI (needs the index)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs the flag-scale wheel from PyPI is a contract test."""
    for item in items:
        if "flagscale_site" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.contract)


@pytest.fixture(scope="session")
def ansible_collections() -> Path:
    """The collections `flagops setup` installed into the real $FLAGOPS_HOME (installed
    now if missing: the one step of the unit tests that may need the package index)."""
    from flagops import resources

    resources.ensure_collections()
    return resources.collections_dir()


@pytest.fixture(autouse=True)
def flagops_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ansible_collections: Path) -> Path:
    """Never touch the developer's ~/.flagops from tests (the installed collections are
    shared read-only through a link)."""
    home = tmp_path / "flagops-home"
    home.mkdir(mode=0o700)
    os.symlink(ansible_collections, home / "collections")
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
