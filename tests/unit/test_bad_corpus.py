"""Every file in tests/bad/ must be rejected by `flagops validate` with exit 2, no
traceback, and a line `<file>:<line>:<col>: ...` that contains the file's expectation.

Each corpus file states its expectation in its header:
    # <why it is bad>
    # expect: <substring of the message>
    # at: [<other file>:]<line>:<col>   (default file: the corpus file itself)
The positions were computed from the text when the corpus was written, not from
flagops' output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from flagops.cli import main

BAD = Path(__file__).resolve().parent.parent / "bad"
CASES = sorted(BAD.glob("*.yaml"))


def _header(path: Path) -> tuple[str, str]:
    text = path.read_text(encoding="utf-8")
    expect = re.search(r"^# expect: (.*)$", text, re.M)
    at = re.search(r"^# at: (.*)$", text, re.M)
    assert expect and at, f"{path.name}: missing '# expect:' or '# at:' header"
    return expect.group(1), at.group(1)


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_input_is_rejected(path: Path, in_repo: Path) -> None:
    expect, at = _header(path)
    rel = path.relative_to(in_repo).as_posix()
    where = at if re.match(r"^[^:]+\.ya?ml:\d+:\d+$", at) else f"{rel}:{at}"
    result = CliRunner().invoke(main, ["validate", rel])
    out = result.stderr
    assert result.exit_code == 2, out
    assert "Traceback" not in out
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = out.splitlines()
    assert re.fullmatch(r"\d+ problems? found", lines[-1])
    matching = [ln for ln in lines if ln.startswith(where + ":")]
    assert matching, f"no problem reported at {where}:\n{out}"
    assert any(expect in ln for ln in matching), f"{expect!r} not in lines at {where}:\n{out}"
    # One line per problem, in the documented shape.
    for ln in lines[:-1]:
        assert re.match(r"^[^:]+:\d+:\d+: /\S*: found .+; expected .+; fix: .+$", ln), ln


def test_secret_value_is_never_echoed(in_repo: Path) -> None:
    result = CliRunner().invoke(main, ["validate", "tests/bad/inline_secret.yaml", "--json"])
    assert result.exit_code == 2
    assert "hunter2" not in result.stdout + result.stderr


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    inv = tmp_path / "many.yaml"
    inv.write_text(
        "all:\n"
        "  vars:\n"
        "    flagops_release: ernie45\n"
        "    flagops_share_root: share\n"          # relative
        "    flagops_container_name: 'a;b'\n"     # unsafe
        "    flagops_slots: 8\n"
        "    flagops_slotz: 8\n"                  # unknown key
        "  children:\n"
        "    master:\n"
        "      hosts:\n"
        "        n1: {ansible_host: 192.0.2.1, ansible_port: 0}\n"  # bad port
        "    workers:\n"
        "      hosts:\n"
        "        n2: {ansible_host: 192.0.2.1}\n"  # duplicate address
    )
    result = CliRunner().invoke(main, ["validate", str(inv), "--json"])
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    pointers = {p["pointer"] for p in payload["problems"]}
    assert pointers == {
        "/all/vars/flagops_share_root",
        "/all/vars/flagops_container_name",
        "/all/vars/flagops_slotz",
        "/all/children/master/hosts/n1/ansible_port",
        "/all/children/workers/hosts/n2/ansible_host",
    }
    assert result.stderr.splitlines()[-1] == "5 problems found"


def test_release_file_errors_point_into_the_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    repo: Path) -> None:
    """A broken catalog entry (from $FLAGOPS_CATALOG) is reported at its own line:col."""
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    text = (repo / "flagops/releases/ernie45.yaml").read_text(encoding="utf-8")
    text = text.replace("name: ernie45", "name: broken").replace(
        "commit: 230dc1d879d8c2af1e449fc29b0cd1867e07c0c3", "commit: main"
    ).replace("  example: ernie45", "  exampel: ernie45")
    (catalog / "broken.yaml").write_text(text, encoding="utf-8")
    monkeypatch.setenv("FLAGOPS_CATALOG", str(catalog))
    lines = text.splitlines()
    commit_line = next(i for i, ln in enumerate(lines, 1) if ln.startswith("  commit: main"))
    typo_line = next(i for i, ln in enumerate(lines, 1) if ln.startswith("  exampel:"))
    result = CliRunner().invoke(
        main, ["validate", str(repo / "inventories/a800.yaml"), "--release", "broken"]
    )
    assert result.exit_code == 2
    err = result.stderr
    rel = str(catalog / "broken.yaml")
    assert f"{rel}:{commit_line}:11: /flagscale/commit: found \"main\"; expected a full 40-hex git commit" in err
    assert f"{rel}:{typo_line}:3: /flagscale/exampel: found unknown key \"exampel\"" in err
    assert 'did you mean "example"?' in err
    # the now-missing `example` is reported too, at the flagscale mapping
    assert "/flagscale: found no \"example\"" in err


def test_unknown_release_on_command_line(repo: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(repo / "inventories/a800.yaml"), "--release", "ernie"])
    assert result.exit_code == 2
    assert '<command line>:1:1: /--release: found release "ernie"' in result.stderr
    assert 'did you mean "ernie45"?' in result.stderr


def test_missing_inventory_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "unreadable file" in result.stderr
