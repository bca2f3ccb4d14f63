"""``flagops verify --bench``: an async load generator for the release's serve profile.

Load (FlagScale's ``serve.profile``, as its auto-tuner reads it):
    input_len, output_len, num_prompts, range_ratio, prefix_len.
``range_ratio`` has FlagScale's meaning (``flagscale/runner/utils.py::dummy_random_input``,
the old vLLM one): lengths are uniform in ``[int(len * range_ratio), len]``, so 1 means
fixed lengths. (``vllm bench serve --random-range-ratio`` today means ``len * (1 ± r)``;
FlagScale's 1 is its 0.)

Prompts are random token ids (sent as a token-id list, so the server sees exactly
``prefix_len + input_len`` tokens, no tokenizer needed here); the ids are drawn from what
the server's ``/tokenize`` makes of plain words, so they are ordinary, non-special tokens;
a shared random prefix of ``prefix_len`` tokens starts every prompt.

Requests are streaming ``/v1/completions`` with ``ignore_eos``; all are sent at once
(request rate infinite), at most ``concurrency`` in flight when given. One request is
sent first and not counted, as ``vllm bench serve``'s initial test run.

Metrics follow vLLM 0.32's ``vllm/benchmarks/serve.py`` (``calculate_metrics``) and
``lib/endpoint_request_func.py`` (``async_request_openai_completions``):
- a request's clock starts just before it is sent; TTFT = first SSE event with choices;
  ITL = the gaps between later such events; latency (E2EL) = the last such event;
- output tokens = ``usage.completion_tokens`` of the final usage chunk;
- TPOT = (latency - TTFT) / (output tokens - 1), for requests with more than one token;
- duration = first send (after the test run) to the last response; throughputs =
  completed requests, output tokens, input + output tokens per second of it;
- mean, median, std and p99 (linear interpolation between closest ranks, numpy's
  default) of TTFT, TPOT, ITL and E2EL in milliseconds.

The HTTP client is :func:`flagops.http.async_client` (httpx, keep-alive pool, the overall
timeout on every read) and the events go through :class:`flagops.http.SSEParser`, the
parser every other flagops stream check uses.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from flagops import http as _http
from flagops.verify.checks import http

# Metrics compared against a baseline: (key, better) - "higher" or "lower".
GATED = (
    ("request_throughput", "higher"),
    ("output_throughput", "higher"),
    ("total_token_throughput", "higher"),
    ("mean_ttft_ms", "lower"),
    ("median_ttft_ms", "lower"),
    ("mean_tpot_ms", "lower"),
    ("median_tpot_ms", "lower"),
    ("mean_itl_ms", "lower"),
)
REPORTED = ("p99_ttft_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms")
LATENCY_SLACK_MS = 0.5  # latency changes smaller than this are noise, whatever the percentage


@dataclass
class Profile:
    input_len: int = 1024
    output_len: int = 1024
    num_prompts: int = 128
    range_ratio: float = 0.5  # FlagScale's default when the profile has none
    prefix_len: int = 0
    concurrency: int | None = None
    seed: int = 0

    @classmethod
    def from_release(cls, release: dict[str, Any], **overrides: Any) -> Profile:
        prof = dict((release.get("serve") or {}).get("profile") or {})
        kwargs = {k: prof[k] for k in ("input_len", "output_len", "num_prompts", "range_ratio", "prefix_len")
                  if prof.get(k) is not None}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)

    def validate(self) -> None:
        for k in ("input_len", "output_len", "num_prompts"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not 0 <= float(self.range_ratio) <= 1:
            raise ValueError(f"range_ratio must be within [0, 1] (FlagScale's meaning), got {self.range_ratio}")
        if int(self.prefix_len) < 0:
            raise ValueError(f"prefix_len must be >= 0, got {self.prefix_len}")
        if self.concurrency is not None and int(self.concurrency) < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


@dataclass
class Request:
    prompt: list[int] | str  # token ids, or (after as_text) the text the server tokenizes
    output_len: int
    prompt_len: int = 0  # tokens intended; the server's usage reports what it saw


@dataclass
class Outcome:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0


# --------------------------------------------------------------------------- statistics


def percentile(values: list[float], p: float) -> float:
    """numpy.percentile's default ('linear'): rank p/100 * (n-1), interpolated."""
    if not values:
        return 0.0
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, "p99": 0.0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))  # numpy.std: population
    return {"mean": mean, "median": percentile(values, 50), "std": std, "p99": percentile(values, 99)}


def calculate_metrics(outcomes: list[Outcome], duration: float) -> dict[str, Any]:
    ttfts, tpots, itls, e2els = [], [], [], []
    completed = total_in = total_out = 0
    for o in outcomes:
        if not o.success:
            continue
        completed += 1
        total_in += o.prompt_len
        total_out += o.output_tokens
        if o.output_tokens > 1:
            tpots.append((o.latency - o.ttft) / (o.output_tokens - 1))
        itls += o.itl
        ttfts.append(o.ttft)
        e2els.append(o.latency)
    m: dict[str, Any] = {
        "duration": duration,
        "completed": completed,
        "failed": len(outcomes) - completed,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": completed / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        for stat, v in _stats(values).items():
            m[f"{stat}_{name}_ms"] = v * 1000.0
    return m


def compare_baseline(current: dict[str, Any], baseline: dict[str, Any], max_regression: float) -> dict[str, Any]:
    """Per-metric change vs a baseline; a gated metric worse by more than ``max_regression``
    percent is a regression (latencies also need to be worse by > LATENCY_SLACK_MS)."""
    rows, regressions = {}, []
    for key, better in GATED + tuple((k, "lower") for k in REPORTED):
        if key not in current or key not in baseline:
            continue
        cur, base = float(current[key]), float(baseline[key])
        change = (cur - base) / base * 100.0 if base else 0.0
        worse = -change if better == "higher" else change
        gated = key in dict(GATED)
        regressed = gated and worse > max_regression and not (key.endswith("_ms") and cur - base <= LATENCY_SLACK_MS)
        rows[key] = {"current": cur, "baseline": base, "change_pct": round(change, 2), "better": better,
                     "gated": gated, "regressed": regressed}
        if regressed:
            regressions.append(f"{key} {base:.4g} -> {cur:.4g} ({change:+.1f}%)")
    return {"max_regression_pct": max_regression, "metrics": rows, "regressions": regressions,
            "ok": not regressions}


# --------------------------------------------------------------------------- prompts


_SYLLABLES = ("ka", "lo", "mi", "ne", "sa", "to", "ru", "vi", "de", "po", "chi", "an", "el", "or", "un", "is",
              "the", "and", "ing", "ion", "er", "at", "re", "ch", "st", "qu")


def token_pool(base_url: str, model: str, seed: int = 0, words: int = 3000) -> list[int]:
    """Ordinary token ids of the served tokenizer: ``/tokenize`` of random plain words."""
    rng = random.Random(seed)
    text = " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(words))
    text += " " + " ".join(str(rng.randint(0, 99999)) for _ in range(300))
    r = http("POST", base_url + "/tokenize", {"model": model, "prompt": text, "add_special_tokens": False},
             timeout=60)
    if r.status == 200:
        ids = sorted(set(r.json().get("tokens") or []))
        if len(ids) >= 16:
            return ids
    return list(range(100, 1000))  # a server without /tokenize: ids every real vocabulary has


def make_requests(profile: Profile, pool: list[int]) -> list[Request]:
    """FlagScale's sampling of lengths, random ids from ``pool``; deterministic per seed."""
    rng = random.Random(profile.seed)
    prefix = [rng.choice(pool) for _ in range(profile.prefix_len)]
    lo_in = max(1, int(profile.input_len * profile.range_ratio))
    lo_out = max(1, int(profile.output_len * profile.range_ratio))
    reqs = []
    for _ in range(profile.num_prompts):
        n_in = rng.randint(lo_in, profile.input_len)
        n_out = rng.randint(lo_out, profile.output_len)
        ids = prefix + [rng.choice(pool) for _ in range(n_in)]
        reqs.append(Request(ids, n_out, len(ids)))
    return reqs


def as_text(base_url: str, model: str, requests: list[Request], workers: int = 8) -> bool:
    """Turn each request's token ids into text of the same token count, as vLLM's random
    dataset does: clients send text, and the server's tokenization is part of TTFT. Uses the
    server's ``/detokenize`` and ``/tokenize``; False (ids kept) where it has none."""
    from concurrent.futures import ThreadPoolExecutor

    def detok(ids: list[int]) -> str | None:
        r = http("POST", base_url + "/detokenize", {"model": model, "tokens": ids}, timeout=30)
        return r.json().get("prompt") if r.status == 200 else None

    def tok(text: str) -> list[int] | None:
        r = http("POST", base_url + "/tokenize", {"model": model, "prompt": text, "add_special_tokens": False},
                 timeout=30)
        return r.json().get("tokens") if r.status == 200 else None

    def convert(req: Request) -> str | None:
        ids = list(req.prompt) if isinstance(req.prompt, list) else []
        text = detok(ids)
        for _ in range(2):  # the round trip may merge or split tokens: trim or pad, then decode again
            again = tok(text) if text is not None else None
            if again is None or len(again) == len(ids):
                break
            fixed = (again + ids)[:len(ids)]
            text = detok(fixed)
        return text

    with ThreadPoolExecutor(max_workers=workers) as pool:
        texts = list(pool.map(convert, requests))
    if any(t is None for t in texts):
        return False
    for req, text in zip(requests, texts, strict=True):
        req.prompt = text
    return True


# --------------------------------------------------------------------------- requests


async def one_request(client: Any, model: str, req: Request, url: str) -> Outcome:
    """Streaming completion, timed as vLLM's async_request_openai_completions does."""
    body = {"model": model, "prompt": req.prompt, "repetition_penalty": 1.0, "max_tokens": req.output_len,
            "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    out = Outcome(prompt_len=req.prompt_len or len(req.prompt))
    st = time.perf_counter()
    out.start = st
    last = st
    first = False
    parser = _http.SSEParser()
    try:
        async with client.stream("POST", url, json=body, headers={"Accept": "text/event-stream"}) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode('utf-8', 'replace')[:300]}"
                return out
            async for line in resp.aiter_lines():
                payload = parser.feed(line)
                if payload is None or payload.strip() == "[DONE]":
                    continue
                obj = json.loads(payload)
                if obj.get("choices"):
                    now = time.perf_counter()
                    if not first:
                        first = True
                        out.ttft = now - st
                    else:
                        out.itl.append(now - last)
                    last = now
                elif obj.get("usage"):
                    out.output_tokens = int(obj["usage"].get("completion_tokens") or 0)
                    if obj["usage"].get("prompt_tokens") is not None:
                        out.prompt_len = int(obj["usage"]["prompt_tokens"])
        if not first:
            out.error = "no streamed token"
        else:
            out.success = True
            out.latency = last - st
    except Exception as exc:  # connection reset, timeout, bad JSON: the request failed
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def _run(base_url: str, model: str, requests: list[Request], concurrency: int | None,
               timeout: float) -> tuple[list[Outcome], float, Outcome]:
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"only http(s):// endpoints are supported, got {base_url!r}")
    url = base_url.rstrip("/") + "/v1/completions"
    client = _http.async_client(timeout)
    try:
        test = await asyncio.wait_for(one_request(client, model, requests[0], url), timeout)
        if not test.success:
            return [], 0.0, test
        sem = asyncio.Semaphore(concurrency) if concurrency else None

        async def limited(r: Request) -> Outcome:
            if sem is None:
                return await one_request(client, model, r, url)
            async with sem:
                return await one_request(client, model, r, url)

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(limited(r)) for r in requests]
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        return list(outcomes), time.perf_counter() - t0, test
    finally:
        await client.aclose()


def run(base_url: str, model: str, profile: Profile, timeout: float = 3600.0) -> dict[str, Any]:
    """Run the profile against ``base_url``; the result document (vLLM's key names)."""
    profile.validate()
    pool = token_pool(base_url, model, profile.seed)
    requests = make_requests(profile, pool)
    text_prompts = as_text(base_url, model, requests)
    t0 = time.time()
    outcomes, duration, test = asyncio.run(_run(base_url, model, requests, profile.concurrency, timeout))
    doc: dict[str, Any] = {
        "tool": "flagops verify --bench",
        "date": time.strftime("%Y%m%d-%H%M%S", time.localtime(t0)),
        "base_url": base_url,
        "model_id": model,
        "endpoint": "/v1/completions",
        "profile": asdict(profile),
        "num_prompts": profile.num_prompts,
        "max_concurrency": profile.concurrency,
        "request_rate": "inf",
        "token_pool": len(pool),
        "prompts": "text" if text_prompts else "token ids",
    }
    if not test.success:
        doc.update(ok=False, error=f"initial test request failed: {test.error}")
        return doc
    doc.update(calculate_metrics(outcomes, duration))
    errors = sorted({o.error for o in outcomes if not o.success})
    doc["errors"] = errors[:5]
    doc["ok"] = doc["failed"] == 0
    return doc


def summary_line(m: dict[str, Any]) -> str:
    return (f"{m['completed']}/{m['num_prompts']} ok in {m['duration']:.2f}s: {m['request_throughput']:.2f} req/s, "
            f"{m['output_throughput']:.1f} out tok/s, {m['total_token_throughput']:.1f} tok/s; "
            f"TTFT {m['mean_ttft_ms']:.1f}/{m['median_ttft_ms']:.1f}/{m['p99_ttft_ms']:.1f} ms, "
            f"TPOT {m['mean_tpot_ms']:.2f}/{m['median_tpot_ms']:.2f}/{m['p99_tpot_ms']:.2f} ms, "
            f"ITL {m['mean_itl_ms']:.2f}/{m['median_itl_ms']:.2f}/{m['p99_itl_ms']:.2f} ms (mean/p50/p99)")
