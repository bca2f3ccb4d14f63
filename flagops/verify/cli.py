"""``flagops verify``: the checks of :mod:`flagops.verify.checks` as a report.

Exit status: 0 all selected checks pass or skip, 1 a check fails (or the benchmark
regresses past the baseline), 2 bad input (unknown check, unreadable reference or
baseline, invalid inventory, conflicting options).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from flagops.cli import _emit_json, _resolve_inventory, handle_errors, json_option, release_option

STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow"}


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v, default=str, separators=(",", ":"))
    return str(v)


def _values_cell(values: dict[str, Any], limit: int = 160) -> str:
    parts = []
    for k, v in values.items():
        if k in ("prompts", "items", "observed", "samples"):
            continue
        parts.append(f"{k}={_fmt_value(v)}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _print_table(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"flagops verify: {doc['release']} at {doc['endpoint']} ({doc['model']})",
                  show_lines=False, expand=True)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("reason", ratio=3, overflow="fold")
    table.add_column("values", ratio=2, overflow="fold")
    for r in doc["checks"]:
        table.add_row(r["name"], f"[{STYLE[r['status']]}]{r['status']}[/]", r["reason"],
                      _values_cell(r["values"]))
    console.print(table)
    s = doc["summary"]
    verdict = "[green]OK[/]" if doc["ok"] else "[bold red]FAILED[/]"
    console.print(f"{verdict}: {s['pass']} pass, {s['fail']} fail, {s['skip']} skip in {doc['wall_s']:.1f}s")


def _parse_checks(only: str | None, skip: str | None) -> list[str]:
    from flagops.verify import checks

    try:
        names = checks.select(only, skip)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--only/--skip") from None
    if not names:
        raise click.BadParameter("no check left to run", param_hint="--only/--skip")
    return names


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint=what) from None
    if not isinstance(doc, dict):
        raise click.BadParameter(f"{path}: not a JSON object", param_hint=what)
    return doc


@click.command()
@click.option("-i", "--inventory", metavar="INVENTORY", help="Default: the last provisioned inventory.")
@release_option
@click.option("--only", metavar="CHECKS", help="Comma list of checks or groups to run (service, cluster, "
              "flaggems, gpu, output, or names such as service.chat).")
@click.option("--skip", metavar="CHECKS", help="Comma list of checks or groups not to run.")
@click.option("--endpoint", metavar="URL", help="API base URL (default: the master's address and the release port).")
@click.option("--bench", is_flag=True, help="Also run the release's serve profile as a benchmark.")
@click.option("--concurrency", type=click.IntRange(min=1), help="Bench: requests in flight (default: all at once).")
@click.option("--num-prompts", type=click.IntRange(min=1), help="Bench: override profile.num_prompts.")
@click.option("--input-len", type=click.IntRange(min=1), help="Bench: override profile.input_len.")
@click.option("--output-len", type=click.IntRange(min=1), help="Bench: override profile.output_len.")
@click.option("--range-ratio", type=click.FloatRange(0, 1), help="Bench: override profile.range_ratio "
              "(FlagScale's meaning: lengths in [len*r, len]; 1 = fixed).")
@click.option("--save", type=click.Path(dir_okay=False), help="Bench: write the result JSON here.")
@click.option("--baseline", type=click.Path(dir_okay=False), help="Bench: compare with this saved result.")
@click.option("--max-regression", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Bench: percent a gated metric may be worse than the baseline.")
@click.option("--reference", type=click.Path(dir_okay=False), help="Reference outputs for output.consistency "
              "(default: flagops/verify/reference/<release>-<model>.json).")
@click.option("--reference-endpoint", metavar="URL", help="Compare output with a second (native) endpoint instead.")
@click.option("--min-agreement", type=click.FloatRange(0, 100), default=100.0, show_default=True,
              help="output.consistency: percent of reference tokens that must match.")
@click.option("--record-reference", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write reference outputs from the current service to FILE and exit.")
@click.option("--list", "list_checks", is_flag=True, help="List the checks and exit.")
@json_option
@handle_errors
def verify(inventory: str | None, release: str | None, only: str | None, skip: str | None, endpoint: str | None,
           bench: bool, concurrency: int | None, num_prompts: int | None, input_len: int | None,
           output_len: int | None, range_ratio: float | None, save: str | None, baseline: str | None,
           max_regression: float, reference: str | None, reference_endpoint: str | None, min_agreement: float,
           record_reference: str | None, list_checks: bool, json_out: bool) -> None:
    """Check a running service: health, cluster, FlagGems, GPUs, output consistency
    (and, with --bench, performance). Exit 1 when a check fails."""
    from flagops.verify import checks

    if list_checks:
        if json_out:
            _emit_json({"checks": list(checks.CHECK_NAMES), "groups": list(checks.GROUPS)})
        else:
            click.echo("\n".join(checks.CHECK_NAMES))
        return
    t_start = time.perf_counter()
    names = _parse_checks(only, skip)
    bench_only = {"--concurrency": concurrency, "--num-prompts": num_prompts, "--input-len": input_len,
                  "--output-len": output_len, "--range-ratio": range_ratio, "--save": save, "--baseline": baseline}
    if not bench and any(v is not None for v in bench_only.values()):
        used = ", ".join(k for k, v in bench_only.items() if v is not None)
        raise click.UsageError(f"{used} only apply with --bench")
    if reference and reference_endpoint:
        raise click.UsageError("--reference and --reference-endpoint exclude each other")
    base_doc = _read_json(baseline, "--baseline") if baseline else None
    if reference:
        from flagops.verify import output

        try:
            output.load_reference(reference)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--reference") from None

    from flagops import config, service

    cfg = config.load(_resolve_inventory(inventory), release)
    base_url = (endpoint or service.endpoint(cfg)).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{base_url!r}: expected http://host:port", param_hint="--endpoint")
    opts = checks.Options(reference=reference, reference_endpoint=reference_endpoint, min_agreement=min_agreement)
    ctx = checks.Context(cfg, base_url, service.served_model(cfg), None, opts)
    ctx.endpoint_overridden = endpoint is not None

    from flagops import api

    if record_reference:
        from flagops.verify import output

        try:
            with api.reach(cfg, ctx):  # behind a jump host: through the port forward
                doc = output.record(ctx, record_reference)
        except output.OutputError as exc:
            click.echo(f"cannot record a reference: {exc}", err=True)
            sys.exit(1)
        n = sum(len(o["token_ids"]) for o in doc["outputs"])
        if json_out:
            _emit_json({"ok": True, "file": record_reference, "prompts": len(doc["outputs"]), "tokens": n})
        else:
            click.echo(f"{record_reference}: {len(doc['outputs'])} prompts, {n} greedy tokens from {base_url}")
        return

    def with_bench(doc: dict[str, Any], results: list[Any]) -> None:
        """The benchmark while the connections (and a port forward) are still open."""
        if not bench:
            return
        doc["bench"] = _bench(ctx, concurrency, num_prompts, input_len, output_len, range_ratio, save, base_doc,
                              max_regression)
        results.append(doc["bench"].pop("_result"))
        doc["checks"].append(results[-1].to_dict())

    doc, results = api.run_checks(cfg, ctx, names, then=with_bench)
    doc["summary"] = checks.summarize(results)
    doc["ok"] = doc["summary"]["fail"] == 0
    doc["wall_s"] = round(time.perf_counter() - t_start, 2)
    if json_out:
        _emit_json(doc)
    else:
        _print_table(doc)
    if not doc["ok"]:
        sys.exit(1)


def _bench(ctx: Any, concurrency: int | None, num_prompts: int | None, input_len: int | None,
           output_len: int | None, range_ratio: float | None, save: str | None,
           base_doc: dict[str, Any] | None, max_regression: float) -> dict[str, Any]:
    from flagops.verify import bench
    from flagops.verify.checks import CheckResult

    prof = bench.Profile.from_release(ctx.release, input_len=input_len, output_len=output_len,
                                      num_prompts=num_prompts, range_ratio=range_ratio, concurrency=concurrency)
    try:
        prof.validate()
    except ValueError as exc:
        raise click.UsageError(f"bench profile: {exc}") from None
    t0 = time.perf_counter()
    res = bench.run(ctx.base_url, ctx.model, prof)
    secs = round(time.perf_counter() - t0, 3)
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        Path(save).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    keys = ("request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms",
            "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms",
            "p99_itl_ms", "completed", "failed", "duration")
    vals = {k: round(res[k], 3) if isinstance(res.get(k), float) else res.get(k) for k in keys if k in res}
    if "error" in res:
        result = CheckResult("bench.serve", "fail", res["error"], vals, secs)
    elif not res["ok"]:
        result = CheckResult("bench.serve", "fail", f"{res['failed']} of {prof.num_prompts} requests failed: "
                             f"{'; '.join(res.get('errors', []))[:300]}", vals, secs)
    else:
        result = CheckResult("bench.serve", "pass", bench.summary_line(res), vals, secs)
        if base_doc is not None:
            cmp = bench.compare_baseline(res, base_doc, max_regression)
            res["baseline"] = cmp
            vals["regressions"] = cmp["regressions"]
            if not cmp["ok"]:
                result.status = "fail"
                result.reason = f"regressed beyond {max_regression:g}% vs baseline: " + "; ".join(cmp["regressions"])
            else:
                result.reason += f"; within {max_regression:g}% of the baseline"
    res["_result"] = result
    return res
