"""roles/weights' module against the lab hub (flagops/lab/hub.py), a real HTTPS server speaking
the ModelScope API, listed with the real ``modelscope`` SDK: parallel ranges, hash while
writing, resume after SIGKILL, and the faults a hub shows (401, 404, 5xx, Range ignored, cut)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from weights_harness import RunningHub, hubmod, make_model, run_module

TOKEN = "lab-token-0123456789"
MODEL = "flagops-lab/tiny"
SIZES = {"model-00001-of-00003.safetensors": 5_000_000, "model-00002-of-00003.safetensors": 3_100_000,
         "model-00003-of-00003.safetensors": 700_001, "config.json": 321, "sub/tokenizer.json": 4096}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ca")
    hubmod.make_ca(out, ["127.0.0.1"])
    return out


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, list[dict]]:
    root = tmp_path / "published" / "tiny"
    return root, make_model(root, SIZES)


def serve(ca: Path, root: Path, **kw) -> RunningHub:
    ctx = hubmod.server_context(ca / "hub.crt", ca / "hub.key")
    return RunningHub({MODEL: root}, tokens={TOKEN}, context=ctx, **kw)


def args(hub: hubmod.Hub, ca: Path, dest: Path, **kw) -> dict:
    a = {"source": {"type": "modelscope", "id": MODEL, "revision": "master", "domain": hub.domain,
                    "ca_bundle": str(ca / "ca.crt")},
         "dest": str(dest), "token": TOKEN, "retries": 3, "backoff_s": 0.05, "chunk_bytes": 65536,
         "part_bytes": 1 << 20, "concurrency": 4}
    a.update(kw)
    return a


def data_requests(hub: hubmod.Hub) -> list[tuple[str, str | None, int]]:
    out = []
    for _method, path, rng, code in hub.log:
        if "/repo?" in path:
            rel = path.split("FilePath=", 1)[1]
            out.append((rel.replace("%2F", "/"), rng, code))
    return out


def assert_model(dest: Path, files: list[dict]) -> None:
    for f in files:
        assert hashlib.sha256((dest / f["path"]).read_bytes()).hexdigest() == f["sha256"], f["path"]
    assert not list(dest.rglob("*.part")) and not list(dest.rglob("*.state")), sorted(dest.rglob("*"))


def test_parallel_ranges_verified_then_noop(ca: Path, model, tmp_path: Path) -> None:
    root, files = model
    dest = tmp_path / "share" / "models" / "tiny"
    with serve(ca, root) as hub:
        res = run_module(args(hub, ca, dest), tmp_path)
        assert res.get("changed") and not res.get("failed"), res
        assert_model(dest, files)
        assert sorted(res["downloaded"]) == sorted(SIZES) and res["bytes_fetched"] == sum(SIZES.values())
        big = [r for r in data_requests(hub) if r[0] == "model-00001-of-00003.safetensors" and r[1] != "bytes=0-0"]
        # 5 MB in 1 MiB ranges, each asked for once and answered 206
        assert {r[2] for r in big} == {206}, big
        assert sorted(r[1] for r in big) == ["bytes=0-1048575", "bytes=1048576-2097151",
                                             "bytes=2097152-3145727", "bytes=3145728-4194303", "bytes=4194304-"]
        assert json.loads((dest / ".flagops-weights.json").read_text())["complete"] is True
        hub.log.clear()
        again = run_module(args(hub, ca, dest), tmp_path)
        assert again["changed"] is False and again["verified"] == len(SIZES), again
        assert data_requests(hub) == []


def test_plan_only_decides_without_touching_anything(ca: Path, model, tmp_path: Path) -> None:
    """The role's synchronous first look: work to do -> needs_job and nothing written; a complete,
    recorded model -> needs_job False with no data requests; a file not in the record (placed by hand)
    -> needs_job, because hashing it is the background job's work."""
    root, files = model
    dest = tmp_path / "dest"
    with serve(ca, root) as hub:
        plan = run_module(args(hub, ca, dest, plan_only=True), tmp_path)
        assert plan["needs_job"] is True and plan["changed"] is False and plan["files_pending"] == len(SIZES), plan
        assert not dest.exists() and data_requests(hub) == []
        assert run_module(args(hub, ca, dest), tmp_path)["changed"] is True
        hub.log.clear()
        plan = run_module(args(hub, ca, dest, plan_only=True), tmp_path)
        assert plan["needs_job"] is False and plan["changed"] is False and plan["verified"] == len(SIZES), plan
        assert data_requests(hub) == []
        os.utime(dest / "config.json", (1, 1))  # the record no longer vouches for it
        plan = run_module(args(hub, ca, dest, plan_only=True), tmp_path)
        assert plan["needs_job"] is True and plan["files_pending"] == 1, plan
    assert_model(dest, files)


def test_check_diff_changes_nothing(ca: Path, model, tmp_path: Path) -> None:
    root, _ = model
    dest = tmp_path / "dest"
    with serve(ca, root) as hub:
        res = run_module(args(hub, ca, dest), tmp_path, check=True, diff=True)
    assert res["changed"] is True and "missing config.json (321 bytes)" in res["diff"]["after"], res
    assert not dest.exists()


def _recorded(state: Path) -> bool:
    """Whether a .part.state records any bytes (it vanishes when its file completes)."""
    try:
        return any(state.read_bytes())
    except FileNotFoundError:
        return False


def test_killed_midway_resumes_refetching_little(ca: Path, model, tmp_path: Path) -> None:
    root, files = model
    total = sum(SIZES.values())
    dest = tmp_path / "dest"
    prog = tmp_path / "progress.json"
    with serve(ca, root, rate_total=2_000_000) as hub:
        proc = run_module(args(hub, ca, dest, progress_file=str(prog), progress_interval_s=0.2), tmp_path, wait=False)
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                doc = json.loads(prog.read_text())
            except (OSError, ValueError):
                doc = {}
            if doc:
                seen.append(doc)
            # half way, with bytes of an unfinished file on disk (which files are in flight at the
            # kill is the workers' race: wait until one of them has recorded bytes)
            in_flight = dest.exists() and any(_recorded(st) for st in dest.rglob("*.part.state"))
            if doc.get("bytes_done", 0) >= total // 2 and in_flight:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        # live progress: bytes done/total, a rate and an ETA while it ran
        mid = [d for d in seen if 0 < d["bytes_done"] < total]
        assert mid and mid[-1]["bytes_total"] == total and mid[-1]["rate_Bps"] > 0 and mid[-1]["eta_s"] > 0, seen[-3:]
        parts = list(dest.rglob("*.part"))
        assert parts, "no partial file left by the kill"
        done = {f["path"] for f in files if (dest / f["path"]).exists()}
        ids = {p: (dest / p).stat().st_ino for p in done}
        res = run_module(args(hub, ca, dest), tmp_path)
        assert res.get("changed") and not res.get("failed"), res
        assert_model(dest, files)
        assert res["resumed"], res
        assert not set(res["downloaded"]) & done, "a complete file was downloaded again"
        assert {p: (dest / p).stat().st_ino for p in done} == ids, "a complete file was touched"
        # every byte the killed run had written (and reported) is kept: the state file records it
        assert res["bytes_to_fetch"] <= total - seen[-1]["bytes_done"], (res["bytes_to_fetch"], seen[-1])
        probes = sum(1 for _m, _p, rng, _c in hub.log if rng == "bytes=0-0")
        in_flight = hub.bytes_sent - probes - total  # sent to the killed run but never written by it
        assert 0 <= in_flight <= 4 * (1 << 20), in_flight
        assert res["bytes_to_fetch"] == res["bytes_fetched"], res


def test_wrong_token_names_the_hub_and_variable(ca: Path, model, tmp_path: Path) -> None:
    root, _ = model
    with serve(ca, root) as hub:
        res = run_module(args(hub, ca, tmp_path / "d", token="not-the-token"), tmp_path)
    assert res.get("failed"), res
    assert f"https://{hub.domain}" in res["msg"] and "HTTP 401" in res["msg"], res["msg"]
    assert "MODELSCOPE_API_TOKEN" in res["msg"] and "not-the-token" not in json.dumps(res), res["msg"]


def test_missing_file_404_names_it(ca: Path, model, tmp_path: Path) -> None:
    root, _ = model
    with serve(ca, root) as hub:
        hub.faults.status["config.json"] = [404]
        res = run_module(args(hub, ca, tmp_path / "d"), tmp_path)
    assert res.get("failed") and "config.json" in res["msg"] and "HTTP 404" in res["msg"], res
    assert not (tmp_path / "d" / "config.json").exists()


def test_5xx_retried_and_cut_connection_resumed(ca: Path, model, tmp_path: Path) -> None:
    root, files = model
    dest = tmp_path / "d"
    with serve(ca, root) as hub:
        hub.faults.status["config.json"] = [503, 500]
        hub.faults.cut_after["model-00003-of-00003.safetensors"] = 300_000
        res = run_module(args(hub, ca, dest), tmp_path)
        assert res.get("changed") and not res.get("failed"), res
        assert_model(dest, files)
        reqs = data_requests(hub)
        assert [r[2] for r in reqs if r[0] == "config.json"][:3] == [503, 500, 206], reqs  # 5xx retried
        third = [r[1] for r in reqs if r[0] == "model-00003-of-00003.safetensors"]
        assert "bytes=300000-" in third, third  # resumed from the byte where the cut came
        assert res["bytes_fetched"] == sum(SIZES.values()), res


def test_server_ignoring_range_restarts_partials(ca: Path, model, tmp_path: Path) -> None:
    root, files = model
    dest = tmp_path / "d"
    dest.mkdir()
    name = "model-00001-of-00003.safetensors"
    (dest / (name + ".part")).write_bytes((root / name).read_bytes()[:1000] + b"garbage")  # a prefix, then junk
    with serve(ca, root) as hub:
        hub.faults.ignore_range = True
        res = run_module(args(hub, ca, dest), tmp_path)
    assert res.get("changed") and not res.get("failed"), res
    assert_model(dest, files)
    assert any("ignores Range" in n for n in res["notes"]), res


def test_corrupt_replaced_unknown_kept(ca: Path, model, tmp_path: Path) -> None:
    root, files = model
    dest = tmp_path / "d"
    with serve(ca, root) as hub:
        assert not run_module(args(hub, ca, dest), tmp_path).get("failed")
        victim = dest / "model-00002-of-00003.safetensors"
        data = bytearray(victim.read_bytes())
        data[100] ^= 0xFF
        victim.write_bytes(bytes(data))
        (dest / "NOTES.md").write_text("mine\n")
        res = run_module(args(hub, ca, dest, verify="full"), tmp_path)
    assert res["replaced_corrupt"] == [victim.name] and res["downloaded"] == [victim.name], res
    assert_model(dest, files)
    assert (dest / "NOTES.md").read_text() == "mine\n"


def test_http_source_without_range_support(model, tmp_path: Path) -> None:
    """A plain static server (no Range): whole files, several at once, verified."""
    root, files = model
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        res = run_module({"source": {"type": "http", "url": f"http://127.0.0.1:{srv.server_address[1]}/"},
                          "dest": str(tmp_path / "d"), "retries": 2, "backoff_s": 0.05}, tmp_path)
    finally:
        srv.shutdown()
        srv.server_close()
    assert res.get("changed") and not res.get("failed"), res
    assert_model(tmp_path / "d", files)
