"""The verify checks and the runner that executes them.

Each check is named ``<group>.<name>`` and yields one :class:`CheckResult`: ``pass``,
``fail`` or ``skip``, a one-line reason, and the values it measured. A *producer*
computes one or more checks from one piece of work (one probe run answers all four
``flaggems.*`` checks). Producers run concurrently, in two lanes:

- the **http lane** talks to the vLLM API. It runs its producers one after another,
  because ``output.consistency`` compares greedy token ids and must not share a batch
  with the other requests (batched CPU/GPU kernels need not be bit-identical);
- the **nodes lane**: every producer that looks at the hosts (docker, Ray, probes in
  the containers) gets its own thread, after one warm-up that opens the SSH
  connections in parallel.

Every remote command is an argv list joined by :class:`flagops.nodes.Nodes` with
``shlex.join``; probe sources and arguments travel as positional parameters.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flagops import http as _http
from flagops.http import iter_sse  # noqa: F401 - the one SSE parser, re-exported for the checks

# The result types and the request helper live in flagops.verify.results (output.py uses
# them too); re-exported, because every check and its tests speak of checks.<name>.
from flagops.verify.results import (  # noqa: F401
    CheckResult,
    Context,
    HttpResponse,
    Options,
    _answer,
    failed,
    http,
    passed,
    skipped,
)

PROBES_DIR = Path(__file__).resolve().parent / "probes"
TRUTHY = ("1", "true", "yes", "on")
FLAGGEMS_OPLOG = "/tmp/gems_oplist.log.txt"  # FlagScale's patched gpu_model_runner writes here
METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


# --------------------------------------------------------------------------- parsers


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value); comments skipped."""
    out: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        labels = {k: bytes(v, "utf-8").decode("unicode_escape") for k, v in _LABEL_RE.findall(m.group(3) or "")}
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        out.append((m.group(1), labels, value))
    return out


def metric_values(samples: Iterable[tuple[str, dict[str, str], float]], names: Iterable[str],
                  model: str | None = None) -> dict[str, float | None]:
    """Sum of each named gauge over its series (one per engine), for ``model`` if labelled."""
    want = {n: None for n in names}
    for name, labels, value in samples:
        if name in want and (model is None or labels.get("model_name", model) == model):
            want[name] = (want[name] or 0.0) + value
    return want


def check_chat_stream_events(events: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Problems with a chat-completions SSE stream and what it contained.

    Expected (OpenAI protocol, as vLLM sends it): JSON ``chat.completion.chunk`` events,
    the first delta carries ``role: assistant``, then content deltas, a ``finish_reason``,
    and ``[DONE]`` as the very last event.
    """
    problems: list[str] = []
    chunks: list[dict[str, Any]] = []
    done_at = None
    for i, ev in enumerate(events):
        if ev.strip() == "[DONE]":
            done_at = i
            continue
        if done_at is not None:
            problems.append(f"event after [DONE]: {ev[:80]!r}")
            continue
        try:
            obj = json.loads(ev)
        except ValueError:
            problems.append(f"event {i} is not JSON: {ev[:80]!r}")
            continue
        if obj.get("object") != "chat.completion.chunk":
            problems.append(f"event {i} object={obj.get('object')!r}, expected 'chat.completion.chunk'")
        chunks.append(obj)
    deltas = [c["choices"][0] for c in chunks if c.get("choices")]
    roles = [d.get("delta", {}).get("role") for d in deltas if d.get("delta", {}).get("role")]
    contents = [d["delta"]["content"] for d in deltas if d.get("delta", {}).get("content") is not None]
    finish = [d.get("finish_reason") for d in deltas if d.get("finish_reason")]
    usage = next((c["usage"] for c in chunks if c.get("usage")), None)
    if done_at is None:
        problems.append("no [DONE] event")
    if not deltas:
        problems.append("no chunk with choices")
    elif deltas[0].get("delta", {}).get("role") != "assistant":
        problems.append(f"first delta has role {deltas[0].get('delta', {}).get('role')!r}, expected 'assistant'")
    if not contents:
        problems.append("no content delta")
    if not finish:
        problems.append("no finish_reason")
    info = {"events": len(events), "chunks": len(chunks), "role_deltas": len(roles), "content_deltas": len(contents),
            "content_chars": sum(len(c) for c in contents), "finish_reason": finish[-1] if finish else None,
            "usage": usage, "done": done_at is not None}
    return problems, info


def version_tuple(v: Any) -> tuple[int, ...]:
    """'2.2' -> (2, 2); '535.154.05' -> (535, 154, 5); trailing zeros dropped, suffixes ignored."""
    parts = []
    for p in str(v).strip().split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def env_truthy(value: Any) -> bool:
    return value is not None and str(value).strip().lower() in TRUTHY


# --------------------------------------------------------------------------- service lane


def check_health(ctx: Context) -> list[CheckResult]:
    r = http("GET", ctx.base_url + "/health", timeout=ctx.options.http_timeout)
    vals = {"status": r.status, "ms": round(r.seconds * 1000, 1)}
    if r.status == 200:
        return [passed("service.health", f"GET /health -> 200 in {vals['ms']} ms", **vals)]
    return [failed("service.health", f"GET {ctx.base_url}/health -> {_answer(r)}", **vals)]


def check_models(ctx: Context) -> list[CheckResult]:
    r = http("GET", ctx.base_url + "/v1/models", timeout=ctx.options.http_timeout)
    if r.status != 200:
        return [failed("service.models", f"GET /v1/models -> {_answer(r)}")]
    try:
        data = r.json().get("data", [])
        ids = [m.get("id") for m in data]
    except (ValueError, AttributeError):
        return [failed("service.models", f"GET /v1/models: not an OpenAI model list: {r.text[:200]!r}")]
    vals: dict[str, Any] = {"models": ids}
    entry = next((m for m in data if m.get("id") == ctx.model), None)
    if entry is None:
        return [failed("service.models", f"{ctx.model!r} not listed; the service lists {ids}", **vals)]
    vals["max_model_len"] = entry.get("max_model_len")
    return [passed("service.models", f"{ctx.model} listed (max_model_len {entry.get('max_model_len')})", **vals)]


def _openai_client(ctx: Context) -> Any:
    import openai

    # The SDK on flagops' one httpx client: same transport, pool and (per request) timeout.
    return openai.OpenAI(base_url=ctx.base_url + "/v1", api_key=os.environ.get("OPENAI_API_KEY") or "EMPTY",
                         max_retries=0, timeout=_http.timeout_of(ctx.options.http_timeout),
                         http_client=_http.client())


CHAT_MESSAGES = [{"role": "user", "content": "Say hello to flagops."}]
CHAT_MAX_TOKENS = 8


def check_chat(ctx: Context) -> list[CheckResult]:
    name = "service.chat"
    try:
        client = _openai_client(ctx)
    except ImportError as exc:
        return [skipped(name, f"the openai package is not installed ({exc})")]
    t0 = time.perf_counter()
    try:
        resp = client.chat.completions.create(model=ctx.model, messages=CHAT_MESSAGES, max_tokens=CHAT_MAX_TOKENS,
                                              temperature=0, extra_body={"ignore_eos": True})
    except Exception as exc:  # openai raises APIStatusError/APIConnectionError/ValidationError...
        return [failed(name, f"chat completion failed: {type(exc).__name__}: {str(exc)[:300]}")]
    secs = time.perf_counter() - t0
    choice = resp.choices[0] if resp.choices else None
    usage = resp.usage.model_dump() if resp.usage else None
    vals = {"ms": round(secs * 1000, 1), "finish_reason": getattr(choice, "finish_reason", None), "usage": usage,
            "content_chars": len(choice.message.content or "") if choice else 0}
    problems = []
    if resp.object != "chat.completion":
        problems.append(f"object={resp.object!r}")
    if choice is None or choice.message.content is None:
        problems.append("no message content")
    if choice is not None and choice.message.role != "assistant":
        problems.append(f"role={choice.message.role!r}")
    if not usage or usage.get("completion_tokens") != CHAT_MAX_TOKENS:
        problems.append(f"usage.completion_tokens={usage and usage.get('completion_tokens')}, "
                        f"expected {CHAT_MAX_TOKENS} (ignore_eos)")
    if problems:
        return [failed(name, "non-stream chat: " + "; ".join(problems), **vals)]
    return [passed(name, f"{CHAT_MAX_TOKENS} tokens in {vals['ms']} ms, finish_reason {vals['finish_reason']}",
                   **vals)]


def check_chat_stream(ctx: Context) -> list[CheckResult]:
    name = "service.chat_stream"
    try:
        client = _openai_client(ctx)
        from openai.types.chat import ChatCompletionChunk
    except ImportError as exc:
        return [skipped(name, f"the openai package is not installed ({exc})")]
    t0 = time.perf_counter()
    ttft = None
    lines: list[str] = []
    try:
        with client.chat.completions.with_streaming_response.create(
            model=ctx.model, messages=CHAT_MESSAGES, max_tokens=CHAT_MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        ) as resp:
            ctype = resp.headers.get("content-type", "")
            for line in resp.iter_lines():
                if ttft is None and line.startswith("data:"):
                    ttft = time.perf_counter() - t0
                lines.append(line)
    except Exception as exc:
        return [failed(name, f"stream failed: {type(exc).__name__}: {str(exc)[:300]}")]
    events = list(iter_sse(lines))
    problems, info = check_chat_stream_events(events)
    if "text/event-stream" not in ctype:
        problems.append(f"content-type {ctype!r}, expected text/event-stream")
    for ev in events:  # every chunk must parse as the openai client's ChatCompletionChunk
        if ev.strip() != "[DONE]":
            try:
                ChatCompletionChunk.model_validate(json.loads(ev))
            except Exception as exc:
                problems.append(f"chunk does not validate as ChatCompletionChunk: {str(exc)[:150]}")
                break
    usage = info.get("usage") or {}
    if usage.get("completion_tokens") != CHAT_MAX_TOKENS:
        problems.append(f"usage.completion_tokens={usage.get('completion_tokens')}, expected {CHAT_MAX_TOKENS}")
    info["ttft_ms"] = round(ttft * 1000, 1) if ttft is not None else None
    info["ms"] = round((time.perf_counter() - t0) * 1000, 1)
    if problems:
        return [failed(name, "SSE: " + "; ".join(problems), **info)]
    return [passed(name, f"role delta, {info['content_deltas']} content deltas, finish_reason "
                         f"{info['finish_reason']}, [DONE]; first event after {info['ttft_ms']} ms", **info)]


def check_metrics(ctx: Context) -> list[CheckResult]:
    name = "service.metrics"
    r = http("GET", ctx.base_url + "/metrics", timeout=ctx.options.http_timeout)
    if r.status != 200:
        return [failed(name, f"GET /metrics -> {_answer(r)}")]
    samples = parse_prometheus(r.text)
    got = metric_values(samples, METRICS, ctx.model)
    if all(v is None for v in got.values()):  # labelled with another model name?
        got = metric_values(samples, METRICS)
    vals = {
        "num_requests_running": got["vllm:num_requests_running"],
        "num_requests_waiting": got["vllm:num_requests_waiting"],
        "kv_cache_usage_perc": got["vllm:kv_cache_usage_perc"],
        "samples": len(samples),
    }
    missing = [k for k, v in got.items() if v is None]
    if missing:
        return [failed(name, f"/metrics has no {', '.join(missing)} ({len(samples)} samples)", **vals)]
    kv = vals["kv_cache_usage_perc"]
    return [passed(name, f"running {vals['num_requests_running']:g}, waiting {vals['num_requests_waiting']:g}, "
                         f"KV cache {kv * 100:.1f}% used", **vals)]


# --------------------------------------------------------------------------- nodes lane


def _image_repo(ref: str) -> str:
    """Repository part of an image reference (drops ``:tag`` and ``@digest``)."""
    name = ref.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(last)] + last.split(":", 1)[0]


def check_containers(ctx: Context) -> list[CheckResult]:
    from flagops import service

    name = "cluster.containers"
    cfg = ctx.cfg
    info = service.containers(cfg, ctx.nodes)
    ref = str(cfg.release.get("image", {}).get("ref", ""))
    repo = _image_repo(ref)
    problems: list[str] = []
    per_host: dict[str, Any] = {}
    for h in cfg.hosts:
        c = info.get(h.name, {"reachable": False, "reason": "no answer"})
        digests = c.get("digests") or []
        digest = next((d for d in digests if d.split("@", 1)[0] == repo), None)
        per_host[h.name] = {"running": c.get("running"), "managed": c.get("managed"), "status": c.get("status"),
                            "image_id": c.get("image_id"), "digest": digest}
        if not c.get("reachable"):
            problems.append(f"{h.name}: unreachable ({c.get('reason')})")
        elif not c.get("running"):
            problems.append(f"{h.name}: container {cfg.container_name} not running "
                            f"({c.get('reason') or c.get('status')})")
        elif not c.get("managed"):
            problems.append(f"{h.name}: container {cfg.container_name} is not managed by flagops "
                            f"(no io.flagops.managed=true label)")
    ids = {v["image_id"] for v in per_host.values() if v["image_id"]}
    digests = {v["digest"] for v in per_host.values() if v["image_id"]}
    if len(ids) > 1:
        problems.append("different images: " + ", ".join(f"{h}={v['image_id']}" for h, v in per_host.items()))
    pinned = ref.split("@", 1)[1] if "@" in ref else None
    if pinned and ids and not all(v["digest"] and v["digest"].endswith("@" + pinned) for v in per_host.values()):
        running = ", ".join(f"{h}={v['digest']}" for h, v in per_host.items())
        problems.append(f"release pins {pinned}; running {running}")
    vals = {"hosts": per_host, "image_ref": ref}
    if problems:
        return [failed(name, "; ".join(problems), **vals)]
    digest = next(iter(digests)) if len(digests) == 1 else None
    image_id = next(iter(ids))
    vals["image_id"] = image_id
    vals["digest"] = digest
    if digest:
        how = f"digest {digest.split('@', 1)[1][:19]}"
    else:
        how = f"image {image_id[:19]} (no registry digest for {repo})"
    return [passed(name, f"{len(per_host)}/{len(per_host)} containers {cfg.container_name} running, managed, "
                         f"one {how}", **vals)]


def check_ray(ctx: Context) -> list[CheckResult]:
    from flagops import service

    name = "cluster.ray"
    cfg = ctx.cfg
    info = service.ray_nodes(ctx.nodes)
    m = service.ray_membership(cfg, info)
    key = m["resource"]
    vals = {"resource": key, "total": m["total"], "expected_total": m["expected_total"],
            "hosts": {h: {"member": v["member"], key: v[key], "expected": v["expected"][key]}
                      for h, v in m["hosts"].items()}}
    if m["error"]:
        return [failed(name, f"Ray head on {cfg.master.name} not answering: {m['error']}", **vals)]
    problems = []
    if m["missing"]:
        problems.append("missing " + ", ".join(m["missing"]))
    for h in cfg.hosts:
        v = m["hosts"][h.name]
        if v["member"] and v[key] != h.slots:
            problems.append(f"{h.name} ({h.address}) registers {v[key]:g} {key}, inventory says {h.slots}")
    extra = [n for n in info.get("nodes", []) if n.get("state") == "ALIVE"
             and n.get("ip") not in {h.address for h in cfg.hosts}]
    if extra:
        vals["unexpected"] = [n.get("ip") for n in extra]
    if problems:
        return [failed(name, "; ".join(problems), **vals)]
    return [passed(name, f"{len(cfg.hosts)} alive nodes, {m['total']:g}/{m['expected_total']} {key} "
                         f"as the inventory declares", **vals)]


# ---- probes in the containers


def probe_source(probe: str) -> str:
    return (PROBES_DIR / f"{probe}.py").read_text(encoding="utf-8")


def activation_prefix(before_start: str | None) -> str:
    """The release's ``runner.before_start`` as a shell prefix, each word re-quoted.

    before_start is validated by config.py to simple forms (``source /abs/bin/activate
    [env]``, ``conda activate env``, ``export K=V``, ``cd /abs``) joined by ``&&``;
    shlex round-trips each word so nothing in it is interpreted beyond the command."""
    if not before_start:
        return ""
    parts = [shlex.join(shlex.split(p)) for p in str(before_start).split("&&") if p.strip()]
    return " && ".join(parts) + " && " if parts else ""


def run_probe(ctx: Context, probe: str, args: list[str], hosts: list[str],
              timeout: float | None = None) -> dict[str, dict[str, Any]]:
    """Run ``probes/<probe>.py`` with the release's python in each host's container.

    The source travels as ``$1`` of ``bash -c '<before_start> && python3 -c "$1" ...'``;
    returns {host: probe document} (a document with status ``fail`` when the probe
    itself broke or the host could not be reached)."""
    script = activation_prefix(ctx.release.get("runner", {}).get("before_start")) + 'exec python3 -c "$1" "${@:2}"'
    res = ctx.nodes.shell_in_container(script, probe_source(probe), *args, hosts=hosts,
                                       timeout=timeout or ctx.options.probe_timeout)
    out: dict[str, dict[str, Any]] = {}
    for host, r in res.items():
        doc = None
        for line in reversed(r.stdout.strip().splitlines()):
            if line.startswith("{"):
                try:
                    doc = json.loads(line)
                    break
                except ValueError:
                    pass
        if doc is None or r.rc != 0:
            err = (r.stderr.strip().splitlines() or [""])[-1][:300]
            doc = {"probe": probe, "status": "fail", "values": {}, "items": [], "broken": True,
                   "reason": f"probe did not run (rc {r.rc}): {err or r.stdout.strip()[-300:]}"}
        out[host] = doc
    return out


FLAGGEMS_CHECKS = ("flaggems.import", "flaggems.enable_signature", "flaggems.env", "flaggems.oplist")


def _items(doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [i for i in doc.get("items", []) if i.get("name") == name]


def _combine(name: str, per_host: dict[str, list[dict[str, Any]]], fallback: dict[str, str]) -> CheckResult:
    """One check from per-host probe items: any fail -> fail; any skip -> skip; else pass."""
    vals: dict[str, Any] = {}
    reasons: dict[str, list[str]] = {"fail": [], "skip": [], "pass": []}
    for host, items in per_host.items():
        if not items:
            reasons["fail"].append(f"{host}: {fallback.get(host) or 'no result'}")
            vals[host] = {"status": "fail"}
            continue
        statuses = [i["status"] for i in items]
        st = "fail" if "fail" in statuses else "skip" if "skip" in statuses else "pass"
        why = "; ".join(i["reason"] for i in items if i["status"] == st)
        reasons[st].append(f"{host}: {why}")
        vals[host] = {"status": st, **{k: v for i in items for k, v in i.get("values", {}).items()
                                       if k not in ("traceback",)}}
    for st in ("fail", "skip", "pass"):
        if reasons[st]:
            if st == "pass" and (reasons["fail"] or reasons["skip"]):
                continue
            return CheckResult(name, st, " | ".join(reasons[st]), vals)
    return CheckResult(name, "fail", "no hosts", vals)


def flaggems_results(ctx: Context, docs: dict[str, dict[str, Any]]) -> list[CheckResult]:
    """Map the flaggems_env probe's items (per host) to the four flaggems.* checks."""
    cfg = ctx.cfg
    fallback = {h: d.get("reason", "") for h, d in docs.items()}
    want = (cfg.release.get("minimums") or {}).get("flaggems")
    imports: dict[str, list[dict[str, Any]]] = {}
    for host, doc in docs.items():
        items = _items(doc, "import")
        ver = next((i.get("values", {}).get("version") for i in items), None)
        if items and items[0]["status"] == "pass" and want is not None:
            if version_tuple(ver) != version_tuple(want):
                items = [{**items[0], "status": "fail",
                          "reason": f"flag_gems {ver}, the release pins {want} (minimums.flaggems)"}]
            else:
                items = [{**items[0], "reason": f"flag_gems {ver} as the release pins"}]
        imports[host] = items
    results = [
        _combine("flaggems.import", imports, fallback),
        _combine("flaggems.enable_signature", {h: _items(d, "enable_signature") for h, d in docs.items()}, fallback),
        _combine("flaggems.env", {h: _items(d, "env_raylet") or _items(d, "env_process") for h, d in docs.items()},
                 fallback),
        _combine("flaggems.oplist", {h: _items(d, "oplog") for h, d in docs.items()}, fallback),
    ]
    # Honest skips: a node without GPUs, a release that switches FlagGems off, or a probe
    # that found no torch/GPU cannot say anything about FlagGems; report why, never fail.
    why: list[str] = []
    if cfg.slot_type == "cpu":
        why.append("the nodes declare no GPUs (flagops_slot_type: cpu); FlagGems needs a GPU")
    use = (cfg.release.get("runner", {}).get("envs") or {}).get("USE_FLAGGEMS")
    if not env_truthy(use):
        shown = str(use).lower() if isinstance(use, bool) or use is None else use
        why.append(f"the release sets runner.envs.USE_FLAGGEMS={shown}")
    probe_skips = {h: d.get("reason") for h, d in docs.items() if d.get("status") == "skip"}
    if probe_skips and not why:
        why.append("probe: " + "; ".join(f"{h}: {r}" for h, r in probe_skips.items()))
    if why:
        for r in results:
            if r.status != "skip":
                r.values["observed"] = {"status": r.status, "reason": r.reason}
            r.status, r.reason = "skip", "; ".join(why) + f" [observed: {r.reason}]"
    return results


def check_flaggems(ctx: Context) -> list[CheckResult]:
    hosts = [h.name for h in ctx.cfg.hosts]
    docs = run_probe(ctx, "flaggems_env", ["--raylet-pid", "auto", "--oplog", FLAGGEMS_OPLOG], hosts)
    return flaggems_results(ctx, docs)


GPU_CHECKS = ("gpu.info", "gpu.nccl", "gpu.ops")


def _probe_result(name: str, doc: dict[str, Any], host: str) -> CheckResult:
    vals = dict(doc.get("values") or {})
    if doc.get("items"):
        vals["items"] = [{k: i.get(k) for k in ("name", "status", "reason")} for i in doc["items"]]
    return CheckResult(name, doc.get("status", "fail"), f"{host}: {doc.get('reason', '')}", vals)


def ops_result(doc: dict[str, Any], host: str) -> CheckResult:
    """gpu.ops from the ops_consistency probe, saying whether the kernel cache was warm:
    cold (empty: every kernel compiled), warm (nothing the cache could serve was
    compiled) or partial; a case over its time limit shows as ``timeout`` in the items."""
    res = _probe_result("gpu.ops", doc, host)
    kc = (doc.get("values") or {}).get("kernel_cache") or {}
    if kc:
        res.values["kernel_cache"] = {k: kc.get(k) for k in (
            "state", "key", "triton_cache_dir", "flaggems_cache_dir", "entries_before", "entries_after",
            "compiled_kernels", "rebuilt_every_process", "new_kernels") if kc.get(k) is not None}
        if kc.get("state") and "kernel cache" not in res.reason:
            res.reason += f"; kernel cache {kc['state']} ({kc.get('compiled_kernels')} kernels compiled)"
    return res


def check_gpu(ctx: Context) -> list[CheckResult]:
    cfg = ctx.cfg
    if cfg.slot_type == "cpu":
        why = "the nodes declare no GPUs (flagops_slot_type: cpu): GPU probes skipped for lack of GPUs"
        return [skipped(n, why + ("; the kernel cache is mounted but not exercised" if n == "gpu.ops" else ""),
                        slot_type=cfg.slot_type) for n in GPU_CHECKS]
    master = cfg.master
    out: list[CheckResult] = []
    # gpu.info on every node; count must equal the node's slots, driver >= minimums.driver.
    hosts = [h.name for h in cfg.hosts]
    by_host = {h.name: h for h in cfg.hosts}
    infos: dict[str, dict[str, Any]] = {}

    def info_one(h: str) -> None:
        infos.update(run_probe(ctx, "gpu_info", ["--expect-gpus", str(by_host[h].slots)], [h], timeout=60))

    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        list(pool.map(info_one, hosts))
    min_driver = (cfg.release.get("minimums") or {}).get("driver")
    per_host = {}
    problems, skips = [], []
    for h in hosts:
        d = infos[h]
        drv = (d.get("values") or {}).get("driver_version")
        per_host[h] = d.get("values") or {}
        if d.get("status") == "fail":
            problems.append(f"{h}: {d.get('reason')}")
        elif d.get("status") == "skip":
            skips.append(f"{h}: {d.get('reason')}")
        elif min_driver and isinstance(drv, str) and version_tuple(drv) < version_tuple(min_driver):
            problems.append(f"{h}: driver {drv} < minimums.driver {min_driver}")
    if problems:
        out.append(failed("gpu.info", " | ".join(problems), hosts=per_host))
    elif skips:
        out.append(skipped("gpu.info", " | ".join(skips), hosts=per_host))
    else:
        out.append(passed("gpu.info", " | ".join(f"{h}: {infos[h].get('reason')}" for h in hosts), hosts=per_host))
    # NCCL and op consistency on the master's GPUs, one after the other (they share them).
    nccl = run_probe(ctx, "nccl_allreduce", ["--nproc", str(master.slots)], [master.name], timeout=360)
    out.append(_probe_result("gpu.nccl", nccl[master.name], master.name))
    # default case set (the release model's ops), one worker per GPU; the probe stops
    # handing out cases at 540 s (--budget-s) so its document always arrives
    ops = run_probe(ctx, "ops_consistency", [], [master.name], timeout=600)
    out.append(ops_result(ops[master.name], master.name))
    return out


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Producer:
    names: tuple[str, ...]
    func: Callable[[Context], list[CheckResult]]
    lane: str  # "http" (sequential, talks to the API) | "nodes" (own thread, SSH)


def _output_consistency(ctx: Context) -> list[CheckResult]:
    from flagops.verify import output

    return [output.check(ctx)]


PRODUCERS: tuple[Producer, ...] = (
    Producer(("service.health",), check_health, "http"),
    Producer(("service.models",), check_models, "http"),
    Producer(("service.chat",), check_chat, "http"),
    Producer(("service.chat_stream",), check_chat_stream, "http"),
    Producer(("service.metrics",), check_metrics, "http"),
    Producer(("output.consistency",), _output_consistency, "http"),
    Producer(("cluster.containers",), check_containers, "nodes"),
    Producer(("cluster.ray",), check_ray, "nodes"),
    Producer(FLAGGEMS_CHECKS, check_flaggems, "nodes"),
    Producer(GPU_CHECKS, check_gpu, "nodes"),
)
CHECK_NAMES: tuple[str, ...] = (
    "service.health", "service.models", "service.chat", "service.chat_stream", "service.metrics",
    "cluster.containers", "cluster.ray", *FLAGGEMS_CHECKS, *GPU_CHECKS, "output.consistency",
)
GROUPS = tuple(dict.fromkeys(n.split(".", 1)[0] for n in CHECK_NAMES))


def _expand(tokens: Iterable[str]) -> set[str]:
    out: set[str] = set()
    bad = []
    for tok in tokens:
        tok = tok.strip()
        if not tok:
            continue
        base = tok[:-2] if tok.endswith(".*") else tok
        if base in CHECK_NAMES:
            out.add(base)
        elif base in GROUPS:
            out.update(n for n in CHECK_NAMES if n.startswith(base + "."))
        else:
            bad.append(tok)
    if bad:
        raise ValueError(f"unknown check {', '.join(map(repr, bad))}; known: {', '.join(GROUPS)} "
                         f"(groups) and {', '.join(CHECK_NAMES)}")
    return out


def select(only: str | Iterable[str] | None = None, skip: str | Iterable[str] | None = None) -> list[str]:
    """The checks to run, in report order. ``only``/``skip``: names or groups, comma lists."""
    def split(v: str | Iterable[str] | None) -> list[str]:
        if v is None:
            return []
        return [p for s in ([v] if isinstance(v, str) else v) for p in s.split(",")]

    chosen = _expand(split(only)) if split(only) else set(CHECK_NAMES)
    chosen -= _expand(split(skip))
    return [n for n in CHECK_NAMES if n in chosen]


def run_checks(ctx: Context, names: list[str], on_result: Callable[[CheckResult], None] | None = None,
               producers: tuple[Producer, ...] = PRODUCERS) -> list[CheckResult]:
    """Run the producers that cover ``names``; http lane in order on one thread, each
    nodes-lane producer on its own thread once the SSH connections are open."""
    wanted = set(names)
    todo = [p for p in producers if wanted & set(p.names)]
    results: dict[str, CheckResult] = {}
    lock = threading.Lock()

    def record(rs: list[CheckResult]) -> None:
        with lock:
            for r in rs:
                if r.name in wanted:
                    results[r.name] = r
                    if on_result:
                        on_result(r)

    def call(p: Producer) -> None:
        t0 = time.perf_counter()
        try:
            rs = p.func(ctx)
        except Exception as exc:  # a broken check is a failed check, never a crash of verify
            rs = [failed(n, f"check crashed: {type(exc).__name__}: {exc}") for n in p.names]
        secs = round(time.perf_counter() - t0, 3)
        for r in rs:
            r.seconds = r.seconds or secs
        record(rs)

    http_lane = [p for p in todo if p.lane == "http"]
    node_lane = [p for p in todo if p.lane == "nodes"]
    warm = threading.Event()

    def warm_up() -> None:
        try:
            if node_lane and ctx.nodes is not None:
                ctx.nodes.run(["true"], timeout=15)  # opens every connection once, in parallel
        finally:
            warm.set()

    def after_warm(p: Producer) -> None:
        warm.wait()
        call(p)

    with ThreadPoolExecutor(max_workers=2 + len(node_lane)) as pool:
        futs = [pool.submit(warm_up), pool.submit(lambda: [call(p) for p in http_lane])]
        futs += [pool.submit(after_warm, p) for p in node_lane]
        for f in futs:
            f.result()
    return [results[n] for n in names if n in results]


def summarize(results: list[CheckResult]) -> dict[str, int]:
    out = {s: 0 for s in ("pass", "fail", "skip")}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    return out
