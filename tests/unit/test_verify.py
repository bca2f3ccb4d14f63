"""flagops verify: check logic against a small local OpenAI-style HTTP server (stdlib), the
probe-to-check mapping with the real flaggems_env probe, the bench statistics and the CLI
(exit codes, --only/--skip, --json, --record-reference, --bench with --baseline)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flagops import config
from flagops.cli import main
from flagops.nodes import Result
from flagops.verify import bench, checks, output

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "inventories" / "lab.yaml"
MODEL = "/models/ERNIE-4.5-tiny-MoE"  # the lab inventory's served model name


# --------------------------------------------------------------------------- a fake server


@dataclass
class Behaviour:
    """What the fake server gets wrong (all False: a well-behaved vLLM)."""

    health: int = 200
    models: list[str] = field(default_factory=lambda: [MODEL])
    no_done: bool = False
    no_role: bool = False
    metrics: str = (
        "# HELP vllm:num_requests_running Number of requests running.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 2.0\n'
        f'vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 1.0\n'
        f'vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}} 0.25\n'
    )
    token_shift: int = 0  # added to every generated token id after the 4th
    token_ids: bool = True  # False: an old vLLM that ignores return_token_ids
    fail_completions: bool = False
    detokenize: bool = False  # True: serves /detokenize (token "w<id>" words) as vLLM does
    requests: list[dict[str, Any]] = field(default_factory=list)


def _gen_ids(prompt: Any, n: int, shift: int) -> list[int]:
    seed = sum(map(ord, prompt)) if isinstance(prompt, str) else sum(prompt)
    return [(seed * 31 + i * 7) % 1000 + (shift if i >= 4 else 0) for i in range(n)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    b: Behaviour

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
        data = (json.dumps(body) if not isinstance(body, str) else body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for ev in events:
            data = f"data: {ev}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self) -> None:  # noqa: N802
        b = self.b
        if self.path == "/health":
            self._send(b.health, "")
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "max_model_len": 512}
                                                        for m in b.models]})
        elif self.path == "/metrics":
            self._send(200, b.metrics, "text/plain; version=0.0.4")
        elif self.path == "/version":
            self._send(200, {"version": "0.32.0"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        b = self.b
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        b.requests.append({"path": self.path, **body})
        if self.path == "/tokenize":
            words = body["prompt"].split()
            if b.detokenize and words and all(re.fullmatch(r"w\d+", w) for w in words):
                self._send(200, {"tokens": [int(w[1:]) for w in words], "count": len(words)})
                return
            self._send(200, {"tokens": [100 + (sum(map(ord, w)) % 500) for w in words], "count": len(words)})
        elif self.path == "/detokenize" and b.detokenize:
            self._send(200, {"prompt": " ".join(f"w{i}" for i in body["tokens"])})
        elif self.path == "/v1/chat/completions":
            n = body.get("max_tokens") or 8
            if not body.get("stream"):
                self._send(200, {"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "length",
                                              "message": {"role": "assistant", "content": "hi " * n}}],
                                 "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}})
                return
            base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
            evs = [] if b.no_role else [json.dumps({**base, "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})]
            for i in range(n):
                evs.append(json.dumps({**base, "choices": [{"index": 0, "delta": {"content": f"t{i}"},
                                                            "finish_reason": "length" if i == n - 1 else None}]}))
            evs.append(json.dumps({**base, "choices": [],
                                   "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}}))
            if not b.no_done:
                evs.append("[DONE]")
            self._sse(evs)
        elif self.path == "/v1/completions":
            if b.fail_completions:
                self._send(500, {"error": {"message": "EngineDeadError"}})
                return
            n = body["max_tokens"]
            ids = _gen_ids(body["prompt"], n, b.token_shift)
            if body.get("stream"):
                evs = [json.dumps({"choices": [{"index": 0, "text": f"t{i}"}]}) for i in range(n)]
                plen = len(body["prompt"]) if isinstance(body["prompt"], list) else len(body["prompt"].split())
                evs += [json.dumps({"choices": [], "usage": {"prompt_tokens": plen, "completion_tokens": n}}),
                        "[DONE]"]
                self._sse(evs)
                return
            choice: dict[str, Any] = {"index": 0, "text": "x" * n, "finish_reason": "length"}
            if b.token_ids:
                choice.update(token_ids=ids, prompt_token_ids=[1, 2, 3])
            elif body.get("logprobs") is not None and body.get("return_tokens_as_token_ids"):
                choice["logprobs"] = {"tokens": [f"token_id:{i}" for i in ids]}
            self._send(200, {"object": "text_completion", "choices": [choice]})
        else:
            self._send(404, {"error": "not found"})


@pytest.fixture
def server() -> Iterator[tuple[str, Behaviour]]:
    b = Behaviour()
    handler = type("H", (Handler,), {"b": b})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", b
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cfg() -> config.Config:
    return config.load(LAB)


def ctx_for(cfg: config.Config, url: str, **opts: Any) -> checks.Context:
    return checks.Context(cfg, url, MODEL, None, checks.Options(**opts))


def one(results: list[checks.CheckResult]) -> checks.CheckResult:
    assert len(results) == 1
    return results[0]


# --------------------------------------------------------------------------- service checks


def test_service_checks_pass_on_a_good_server(server: tuple[str, Behaviour], cfg: config.Config) -> None:
    url, _ = server
    ctx = ctx_for(cfg, url)
    for fn in (checks.check_health, checks.check_models, checks.check_chat, checks.check_chat_stream,
               checks.check_metrics):
        r = one(fn(ctx))
        assert r.status == "pass", (r.name, r.reason)
    m = one(checks.check_metrics(ctx))
    assert m.values["num_requests_running"] == 2.0 and m.values["num_requests_waiting"] == 1.0
    assert m.values["kv_cache_usage_perc"] == 0.25 and "25.0%" in m.reason


def test_health_and_models_fail_with_reason(server: tuple[str, Behaviour], cfg: config.Config) -> None:
    url, b = server
    b.health, b.models = 503, ["other-model"]
    ctx = ctx_for(cfg, url)
    h = one(checks.check_health(ctx))
    assert h.status == "fail" and "503" in h.reason
    m = one(checks.check_models(ctx))
    assert m.status == "fail" and MODEL in m.reason and "other-model" in m.reason


def test_unreachable_endpoint_fails_every_service_check(cfg: config.Config) -> None:
    ctx = ctx_for(cfg, "http://127.0.0.1:9", http_timeout=2)  # discard port: nothing listens
    for fn in (checks.check_health, checks.check_models, checks.check_chat, checks.check_chat_stream,
               checks.check_metrics):
        assert one(fn(ctx)).status == "fail"


def test_stream_without_done_or_role_fails(server: tuple[str, Behaviour], cfg: config.Config) -> None:
    url, b = server
    b.no_done = True
    r = one(checks.check_chat_stream(ctx_for(cfg, url)))
    assert r.status == "fail" and "[DONE]" in r.reason
    b.no_done, b.no_role = False, True
    r = one(checks.check_chat_stream(ctx_for(cfg, url)))
    assert r.status == "fail" and "role" in r.reason


def test_sse_parser() -> None:
    lines = ["data: {\"a\":1}", "", ": ping", "event: x", "data: [DONE]", ""]
    assert list(checks.iter_sse(lines)) == ['{"a":1}', "[DONE]"]
    assert list(checks.iter_sse(["data: one", "data: two", ""])) == ["one\ntwo"]
    assert list(checks.iter_sse(["data:tail-without-blank"])) == ["tail-without-blank"]
    problems, info = checks.check_chat_stream_events(["[DONE]", '{"object":"chat.completion.chunk"}'])
    assert any("after [DONE]" in p for p in problems) and info["done"]


def test_metrics_missing_names_fail(server: tuple[str, Behaviour], cfg: config.Config) -> None:
    url, b = server
    b.metrics = 'vllm:num_requests_running{model_name="x"} 0\nprocess_cpu_seconds_total 1.5\n'
    r = one(checks.check_metrics(ctx_for(cfg, url)))
    assert r.status == "fail" and "vllm:kv_cache_usage_perc" in r.reason and "vllm:num_requests_waiting" in r.reason


def test_prometheus_parsing() -> None:
    text = ('# TYPE a gauge\na{l="x\\"y",model_name="m"} 1.5\na{model_name="m",engine="1"} 2\n'
            'b 3e-1 1700000000\nbad line\n')
    samples = checks.parse_prometheus(text)
    assert samples[0] == ("a", {"l": 'x"y', "model_name": "m"}, 1.5)
    assert checks.metric_values(samples, ["a", "b", "c"], "m") == {"a": 3.5, "b": 0.3, "c": None}


# --------------------------------------------------------------------------- output consistency


def test_output_consistency_record_and_compare(server: tuple[str, Behaviour], cfg: config.Config,
                                               tmp_path: Path) -> None:
    url, b = server
    ref = tmp_path / "ref.json"
    doc = output.record(ctx_for(cfg, url), ref)
    assert len(doc["outputs"]) == len(output.PROMPTS)
    sent = [r for r in b.requests if r["path"] == "/v1/completions"]
    assert all(r["temperature"] == 0 and r["ignore_eos"] and r["return_token_ids"] for r in sent)
    r = output.check(ctx_for(cfg, url, reference=str(ref)))
    assert r.status == "pass" and r.values["agreement_pct"] == 100.0
    b.token_shift = 1  # tokens 4.. differ: 4 of 24 match per prompt
    r = output.check(ctx_for(cfg, url, reference=str(ref)))
    assert r.status == "fail"
    assert r.values["agreement_pct"] == pytest.approx(100 * 4 / 24, abs=0.01)
    assert all(p["first_divergence"] == 4 for p in r.values["prompts"])
    r = output.check(ctx_for(cfg, url, reference=str(ref), min_agreement=10))
    assert r.status == "pass"


def test_output_consistency_against_a_reference_endpoint(server: tuple[str, Behaviour],
                                                         cfg: config.Config) -> None:
    url, _ = server
    r = output.check(ctx_for(cfg, url, reference_endpoint=url))
    assert r.status == "pass" and r.values["tokens"] == len(output.PROMPTS) * output.MAX_TOKENS


def test_output_consistency_logprobs_fallback(server: tuple[str, Behaviour], cfg: config.Config) -> None:
    url, b = server
    b.token_ids = False  # an old vLLM: token ids only through logprobs
    got = output.generate(url, MODEL, ["a", "b"], 6)
    assert got[0]["token_ids"] == _gen_ids("a", 6, 0)
    assert [r.get("logprobs") for r in b.requests] == [None, 0, 0]  # one probe, then logprobs throughout


def test_output_consistency_skips_without_reference(server: tuple[str, Behaviour], cfg: config.Config,
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(output, "REFERENCE_DIR", tmp_path)
    r = output.check(ctx_for(cfg, server[0]))
    assert r.status == "skip" and "--record-reference" in r.reason


def test_output_consistency_fails_when_the_service_errors(server: tuple[str, Behaviour], cfg: config.Config,
                                                          tmp_path: Path) -> None:
    url, b = server
    ref = tmp_path / "ref.json"
    output.record(ctx_for(cfg, url), ref)
    b.fail_completions = True
    r = output.check(ctx_for(cfg, url, reference=str(ref)))
    assert r.status == "fail" and "500" in r.reason


def test_committed_lab_reference_is_well_formed(cfg: config.Config) -> None:
    doc = output.load_reference(output.default_reference(cfg))
    assert doc["served_model"] == MODEL and doc["params"]["temperature"] == 0
    assert all(len(o["token_ids"]) == doc["params"]["max_tokens"] for o in doc["outputs"])


# --------------------------------------------------------------------------- probes -> checks


class FakeNodes:
    """Stands in for flagops.nodes.Nodes: runs the container command locally (no docker)."""

    def __init__(self, cfg: config.Config, docs: dict[str, Any] | None = None, rc: int = 0) -> None:
        self.cfg, self.docs, self.rc = cfg, docs, rc
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def shell_in_container(self, script: str, *args: str, hosts: list[str], timeout: float | None = None
                           ) -> dict[str, Result]:
        self.calls.append((script, args))
        out = {}
        for h in hosts:
            if self.docs is not None:
                out[h] = Result(h, self.rc, json.dumps(self.docs[h]) + "\n", "boom" if self.rc else "")
            else:  # really run the probe with this interpreter (no before_start here)
                done = subprocess.run([sys.executable, "-c", args[0], *args[1:]], capture_output=True, text=True,
                                      timeout=120)
                out[h] = Result(h, done.returncode, done.stdout, done.stderr)
        return out


def test_activation_prefix_requotes_words() -> None:
    assert checks.activation_prefix(None) == ""
    assert checks.activation_prefix("source /opt/v/bin/activate") == "source /opt/v/bin/activate && "
    assert checks.activation_prefix("cd /a b && export X=1") == "cd /a b && export X=1 && "
    assert checks.activation_prefix("source '/x y/activate'") == "source '/x y/activate' && "


def test_flaggems_on_the_lab_skip_with_the_real_probe(cfg: config.Config) -> None:
    """The real probe here (torch on CPU, no flag_gems): all four flaggems checks skip, with why."""
    ctx = checks.Context(cfg, "http://unused", MODEL, FakeNodes(cfg))
    results = checks.check_flaggems(ctx)
    assert [r.name for r in results] == list(checks.FLAGGEMS_CHECKS)
    for r in results:
        assert r.status == "skip", r
        assert "no GPUs" in r.reason and "USE_FLAGGEMS=false" in r.reason
    script, args = ctx.nodes.calls[0]
    assert 'python3 -c "$1"' in script and args[1:] == ("--raylet-pid", "auto", "--oplog", checks.FLAGGEMS_OPLOG)


def _gpu_cfg(cfg: config.Config) -> config.Config:
    import dataclasses

    rel = json.loads(json.dumps(cfg.release))
    rel["runner"]["envs"]["USE_FLAGGEMS"] = True
    rel["minimums"]["flaggems"] = "2.2"
    return dataclasses.replace(cfg, slot_type="gpu", release=rel)


def _doc(import_st: str = "pass", version: str = "2.2", sig: str = "pass", env: str = "pass",
         oplog: str = "pass") -> dict[str, Any]:
    def it(name: str, st: str, **v: Any) -> dict[str, Any]:
        return {"name": name, "status": st, "reason": f"{name} {st}", "values": v}

    items = [it("import", import_st, version=version), it("version", "skip"), it("enable_signature", sig),
             it("env_process", "fail"), it("env_raylet", env, pid=7), it("oplog", oplog)]
    st = "fail" if "fail" in (import_st, sig, env, oplog) else "pass"
    return {"probe": "flaggems_env", "status": st, "reason": "x", "values": {}, "items": items}


def test_flaggems_mapping_on_a_gpu_release(cfg: config.Config) -> None:
    g = _gpu_cfg(cfg)
    ctx = checks.Context(g, "http://unused", MODEL, None)
    ok = checks.flaggems_results(ctx, {"node1": _doc(), "node2": _doc()})
    assert [r.status for r in ok] == ["pass"] * 4
    bad = checks.flaggems_results(ctx, {"node1": _doc(), "node2": _doc(version="5.0.2", sig="fail", oplog="fail")})
    by = {r.name: r for r in bad}
    assert by["flaggems.import"].status == "fail" and "5.0.2" in by["flaggems.import"].reason
    assert by["flaggems.enable_signature"].status == "fail" and "node2" in by["flaggems.enable_signature"].reason
    assert by["flaggems.env"].status == "pass"  # the raylet item, not this process's env
    assert by["flaggems.oplist"].status == "fail"


def test_broken_probe_is_a_failure_not_a_crash(cfg: config.Config) -> None:
    g = _gpu_cfg(cfg)
    ctx = checks.Context(g, "http://unused", MODEL, FakeNodes(g, {"node1": {}, "node2": {}}, rc=1))
    results = checks.check_flaggems(ctx)
    assert all(r.status == "fail" and "probe did not run" in r.reason for r in results)


def test_gpu_checks_skip_on_cpu_nodes_without_running_anything(cfg: config.Config) -> None:
    ctx = checks.Context(cfg, "http://unused", MODEL, FakeNodes(cfg, {}))
    results = checks.check_gpu(ctx)
    assert [(r.name, r.status) for r in results] == [(n, "skip") for n in checks.GPU_CHECKS]
    assert all("declare no GPUs" in r.reason for r in results) and ctx.nodes.calls == []


def test_version_tuple() -> None:
    assert checks.version_tuple("2.2") == checks.version_tuple("2.2.0") == (2, 2)
    assert checks.version_tuple("535.154.05") > checks.version_tuple("535.104.12")


# --------------------------------------------------------------------------- selection and runner


def test_select_only_skip_and_groups() -> None:
    assert checks.select() == list(checks.CHECK_NAMES)
    assert checks.select("service") == [n for n in checks.CHECK_NAMES if n.startswith("service.")]
    assert checks.select("service,gpu.info", "service.metrics")[-1] == "gpu.info"
    assert "service.metrics" not in checks.select("service", "service.metrics")
    assert checks.select(None, "flaggems,gpu") == [n for n in checks.CHECK_NAMES
                                                   if not n.startswith(("flaggems", "gpu"))]
    with pytest.raises(ValueError, match="unknown check 'servce'"):
        checks.select("servce")


def test_runner_runs_lanes_concurrently_and_survives_a_crash(cfg: config.Config) -> None:
    import time

    def slow(name: str) -> checks.Producer:
        return checks.Producer((name,), lambda ctx: (time.sleep(0.5), [checks.passed(name, "ok")])[1], "nodes")

    def boom(ctx: checks.Context) -> list[checks.CheckResult]:
        raise RuntimeError("kaput")

    producers = (slow("cluster.containers"), slow("cluster.ray"), checks.Producer(("gpu.info",), boom, "nodes"))
    ctx = checks.Context(cfg, "http://unused", MODEL, None)
    t0 = time.perf_counter()
    res = checks.run_checks(ctx, ["cluster.containers", "cluster.ray", "gpu.info"], producers=producers)
    assert time.perf_counter() - t0 < 0.9  # the two 0.5 s checks overlapped
    assert [(r.name, r.status) for r in res] == [("cluster.containers", "pass"), ("cluster.ray", "pass"),
                                                 ("gpu.info", "fail")]
    assert "kaput" in res[2].reason


# --------------------------------------------------------------------------- bench


def test_percentile_matches_numpy_linear() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0]
    # numpy.percentile(xs, [0, 50, 99, 100]) (method 'linear')
    assert [bench.percentile(xs, p) for p in (0, 50, 99, 100)] == pytest.approx([1.0, 3.5, 9.75, 10.0])
    assert bench.percentile([], 50) == 0.0


def test_calculate_metrics_as_vllm_defines_them() -> None:
    outs = [bench.Outcome(True, "", 10, 4, ttft=0.1, latency=0.4, itl=[0.1, 0.1, 0.1]),
            bench.Outcome(True, "", 10, 1, ttft=0.2, latency=0.2, itl=[]),
            bench.Outcome(False, "x", 10, 0)]
    m = bench.calculate_metrics(outs, 2.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 20, 5)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 2.5 and m["total_token_throughput"] == 12.5
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["mean_tpot_ms"] == pytest.approx(100.0)  # only requests with > 1 token
    assert m["mean_itl_ms"] == pytest.approx(100.0) and m["p99_ttft_ms"] == pytest.approx(199.0)


def test_baseline_regression() -> None:
    base = {"request_throughput": 10.0, "output_throughput": 100.0, "total_token_throughput": 300.0,
            "mean_ttft_ms": 100.0, "median_ttft_ms": 100.0, "mean_tpot_ms": 10.0, "median_tpot_ms": 10.0,
            "mean_itl_ms": 10.0, "p99_itl_ms": 10.0}
    same = bench.compare_baseline(dict(base), base, 10)
    assert same["ok"] and not same["regressions"]
    slower = {**base, "output_throughput": 85.0, "mean_ttft_ms": 109.0, "p99_itl_ms": 30.0}
    cmp = bench.compare_baseline(slower, base, 10)
    assert not cmp["ok"] and len(cmp["regressions"]) == 1 and "output_throughput" in cmp["regressions"][0]
    assert cmp["metrics"]["p99_itl_ms"]["regressed"] is False  # reported, not gated
    assert bench.compare_baseline(slower, base, 20)["ok"]
    tiny = {**base, "mean_itl_ms": 0.02}
    assert bench.compare_baseline({**tiny, "mean_itl_ms": 0.2}, tiny, 10)["ok"]  # +0.18 ms is noise


def test_profile_from_release_and_lengths(cfg: config.Config) -> None:
    p = bench.Profile.from_release(cfg.release)
    assert (p.input_len, p.output_len, p.num_prompts) == (128, 64, 8)
    p = bench.Profile(input_len=10, output_len=6, num_prompts=50, range_ratio=0.5, prefix_len=3, seed=1)
    reqs = bench.make_requests(p, list(range(100, 200)))
    assert all(3 + 5 <= len(r.prompt) <= 3 + 10 and 3 <= r.output_len <= 6 for r in reqs)
    assert len({tuple(r.prompt[:3]) for r in reqs}) == 1  # one shared prefix
    assert reqs == bench.make_requests(p, list(range(100, 200)))  # deterministic
    fixed = bench.make_requests(bench.Profile(input_len=7, output_len=4, num_prompts=5, range_ratio=1), [1, 2])
    assert {(len(r.prompt), r.output_len) for r in fixed} == {(7, 4)}
    with pytest.raises(ValueError):
        bench.Profile(range_ratio=1.5).validate()


def test_bench_run_against_the_server(server: tuple[str, Behaviour]) -> None:
    url, b = server
    res = bench.run(url, MODEL, bench.Profile(input_len=16, output_len=5, num_prompts=6, range_ratio=1,
                                              concurrency=2))
    assert res["ok"] and res["completed"] == 6 and res["failed"] == 0 and res["prompts"] == "token ids"
    assert res["total_output_tokens"] == 30 and res["total_input_tokens"] == 96
    assert res["mean_ttft_ms"] > 0 and res["mean_itl_ms"] > 0 and res["request_throughput"] > 0
    streamed = [r for r in b.requests if r["path"] == "/v1/completions"]
    assert len(streamed) == 7  # the uncounted test request + 6
    assert all(r["stream"] and r["ignore_eos"] and r["stream_options"] == {"include_usage": True}
               for r in streamed)


def test_bench_sends_text_prompts_where_the_server_detokenizes(server: tuple[str, Behaviour]) -> None:
    """Like vLLM's random dataset: text of the intended token count, so the server's own
    tokenization is inside TTFT; without /detokenize the ids are sent (previous test)."""
    url, b = server
    b.detokenize = True
    res = bench.run(url, MODEL, bench.Profile(input_len=16, output_len=5, num_prompts=6, range_ratio=1))
    assert res["ok"] and res["prompts"] == "text"
    streamed = [r for r in b.requests if r["path"] == "/v1/completions"]
    assert all(isinstance(r["prompt"], str) and len(r["prompt"].split()) == 16 for r in streamed)
    assert res["total_input_tokens"] == 96


def test_bench_reports_failed_requests(server: tuple[str, Behaviour]) -> None:
    url, b = server
    b.fail_completions = True
    res = bench.run(url, MODEL, bench.Profile(input_len=4, output_len=2, num_prompts=2, range_ratio=1))
    assert not res["ok"] and "initial test request failed" in res["error"]


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, ["verify", *args], catch_exceptions=False)


def test_cli_json_pass_and_exit_codes(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    url, b = server
    ref = tmp_path / "ref.json"
    r = _cli("-i", str(LAB), "--endpoint", url, "--record-reference", str(ref))
    assert r.exit_code == 0 and ref.is_file()
    r = _cli("-i", str(LAB), "--endpoint", url, "--only", "service,output", "--reference", str(ref), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["ok"] and doc["summary"] == {"pass": 6, "fail": 0, "skip": 0}
    assert [c["name"] for c in doc["checks"]] == checks.select("service,output")
    b.health = 500
    r = _cli("-i", str(LAB), "--endpoint", url, "--only", "service.health", "--json")
    assert r.exit_code == 1 and json.loads(r.output)["checks"][0]["status"] == "fail"
    r = _cli("-i", str(LAB), "--endpoint", url, "--only", "service.health")  # the table
    assert r.exit_code == 1 and "service.health" in r.output and "FAILED" in r.output


def test_cli_skips_gpu_checks_on_the_lab(server: tuple[str, Behaviour]) -> None:
    r = _cli("-i", str(LAB), "--endpoint", server[0], "--only", "gpu", "--json")
    doc = json.loads(r.output)
    assert r.exit_code == 0 and [c["status"] for c in doc["checks"]] == ["skip"] * 3


@pytest.mark.parametrize("args", [
    ["--only", "nosuch"],
    ["--skip", "service,cluster,flaggems,gpu,output"],
    ["--concurrency", "4"],
    ["--bench", "--baseline", "/nonexistent/base.json"],
    ["--reference", "/nonexistent/ref.json"],
    ["--reference", "a.json", "--reference-endpoint", "http://x:1"],
    ["--endpoint", "ftp://x"],
    ["--bench", "--num-prompts", "0"],
])
def test_cli_bad_input_exits_2(server: tuple[str, Behaviour], args: list[str]) -> None:
    r = _cli("-i", str(LAB), *(["--endpoint", server[0]] if "--endpoint" not in args else []), *args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output


def test_cli_bad_inventory_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "inv.yaml"
    bad.write_text("all: {vars: {flagops_release: nosuch}}\n")
    assert _cli("-i", str(bad)).exit_code == 2


def test_cli_bench_save_and_baseline(server: tuple[str, Behaviour], tmp_path: Path) -> None:
    url, _ = server
    saved = tmp_path / "b.json"
    r = _cli("-i", str(LAB), "--endpoint", url, "--only", "service.health", "--bench", "--num-prompts", "3",
             "--input-len", "8", "--output-len", "3", "--save", str(saved), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["checks"][-1]["name"] == "bench.serve" and doc["checks"][-1]["status"] == "pass"
    assert json.loads(saved.read_text())["completed"] == 3
    # a baseline 10x faster than anything this server can do: the run regresses -> exit 1
    fast = json.loads(saved.read_text())
    fast.update(output_throughput=fast["output_throughput"] * 10, request_throughput=fast["request_throughput"] * 10)
    base = tmp_path / "base.json"
    base.write_text(json.dumps(fast))
    r = _cli("-i", str(LAB), "--endpoint", url, "--only", "service.health", "--bench", "--num-prompts", "3",
             "--input-len", "8", "--output-len", "3", "--baseline", str(base), "--json")
    assert r.exit_code == 1
    b = json.loads(r.output)["checks"][-1]
    assert b["status"] == "fail" and "output_throughput" in b["reason"]


def test_gpu_ops_reports_the_kernel_cache_state() -> None:
    doc = {"probe": "ops_consistency", "status": "fail", "reason": "14 pass, 0 fail, 1 timeout, 0 skip in 70 s",
           "values": {"kernel_cache": {"state": "cold", "key": "nvidia-h200_fg-5.0.2_triton-3.6.0",
                                       "triton_cache_dir": "/flagops/triton-cache", "compiled_kernels": 213,
                                       "entries_before": 0, "entries_after": 240}},
           "items": [{"name": "topk[float32,top-k-vocab-256x103424-k50]", "status": "timeout",
                      "reason": "timeout: still running after 150.2 s (limit 150 s)", "values": {}}]}
    r = checks.ops_result(doc, "node1")
    assert r.status == "fail" and r.reason.endswith("kernel cache cold (213 kernels compiled)")
    assert r.values["kernel_cache"]["key"] == "nvidia-h200_fg-5.0.2_triton-3.6.0"
    assert r.values["items"][0]["status"] == "timeout"
    warm = checks.ops_result({**doc, "status": "pass", "reason": "15 pass; kernel cache warm (0 kernels compiled)",
                              "values": {"kernel_cache": {"state": "warm", "compiled_kernels": 0}}}, "node1")
    assert warm.reason.count("kernel cache") == 1 and warm.values["kernel_cache"]["state"] == "warm"


def test_gpu_ops_skip_on_cpu_nodes_says_the_cache_is_not_exercised(cfg: config.Config) -> None:
    results = {r.name: r for r in checks.check_gpu(checks.Context(cfg, "http://unused", MODEL, FakeNodes(cfg, {})))}
    assert "skipped for lack of GPUs" in results["gpu.ops"].reason
    assert "kernel cache" in results["gpu.ops"].reason and "kernel cache" not in results["gpu.info"].reason
