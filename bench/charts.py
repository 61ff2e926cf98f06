"""Bench results (the JSON every bench script writes) -> compact text, PNG charts, BENCHMARKS.md rows.

    python bench/charts.py summary out/*.json               # a few lines per file (run_gpu.sh ends with this)
    python bench/charts.py render out/*.json --out-dir docs/bench
        # -> <bench>.png (+ <bench>-loss.png) and tables.md (merged: one section per result file) with
        #    date, GPU, commit, command, our number, baseline number, ratio, target

``sft_vs_trl``, ``full_ft_mfu`` and ``engine_latency`` get purpose-built rows and charts; any other
bench JSON with a ``rows`` list is summarized generically (its scalar fields), so every script in
bench/ shows up.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

MAX_ROWS = 12  # per file in the summary: run_gpu.sh's caller sees only the last 12k characters
TABLE_HEADER = "| date | GPU | commit | command | case | ours | baseline | ratio | target | met |\n|---|---|---|---|---|---|---|---|---|---|"


def load(path: Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    data.setdefault("bench", Path(path).stem)
    data["file_stem"] = Path(path).stem  # one script may write several files (run_gpu.sh tags): charts are named by file
    return data


def _num(v: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _name(data: dict[str, Any]) -> str:
    """A result's chart name: its file's stem (one script may write several tagged files), else the bench."""
    return data.get("file_stem") or data["bench"]


def _gpu(data: dict[str, Any]) -> str:
    env = data.get("env") or {}
    return env.get("gpu") or env.get("device") or "?"


# --------------------------------------------------------------------------------------------
# One line per result: what `summary` prints
# --------------------------------------------------------------------------------------------
def _sft_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    for r in data.get("rows", []):
        case = f"{r.get('shape')} {r.get('method')} {r.get('side')}"
        if r.get("tokens_per_s"):
            mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
            lines.append(f"  {case}: {_num(r['tokens_per_s'])} tok/s{mfu}, peak {_num(r.get('peak_mem_gib'), '{:.2f}')} GiB, "
                         f"loss {_num(r.get('final_loss'), '{:.4f}')}")
        else:
            lines.append(f"  {case}: {r.get('skipped') and 'skipped: ' + r['skipped'] or r.get('error', 'no result')}"[:240])
    for c in data.get("comparisons", []):
        target = {True: ", target MET", False: ", target missed", None: ""}[c.get("target_met")]
        lines.append(f"  => {c['shape']} {c['method']} {c.get('side', 'ours')} vs {c['baseline']}: {c['speedup']:.2f}x tok/s, "
                     f"{_num(c.get('mem_ratio'), '{:.2f}')}x mem, loss delta {c['loss_delta']:+.3f} "
                     f"({'agrees' if c['loss_agree'] else 'DIFFERS'}){target}")
    return lines


def _is_ours(side: str | None) -> bool:
    return side is not None and (side == "ours" or side.startswith("ours-") or side.startswith("crucible"))


def _generic_lines(data: dict[str, Any]) -> list[str]:
    rows = data.get("rows")
    if not isinstance(rows, list):  # unknown layout: its scalar top-level fields
        scalars = {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool)) and k not in ("command", "date")}
        return [f"  {json.dumps(scalars, default=str)[:400]}"]
    lines = []
    for r in rows[:MAX_ROWS]:
        scalars = {k: v for k, v in r.items() if isinstance(v, (int, float, str, bool)) or v is None} if isinstance(r, dict) else r
        lines.append(f"  {json.dumps(scalars, default=str)[:300]}")
    if len(rows) > MAX_ROWS:
        lines.append(f"  ... {len(rows) - MAX_ROWS} more rows")
    return lines


def _latency_lines(data: dict[str, Any]) -> list[str]:
    lines = []
    for r in data.get("rows", []):
        if r.get("error"):
            lines.append(f"  {r.get('case')}: {r['error']}"[:240])
        elif "ttft_p99_ms" in r:
            lines.append(f"  {r['case']}: {_num(r['req_per_s'], '{:.1f}')} req/s, {_num(r['out_tok_per_s'])} out tok/s, "
                         f"TTFT p50/p99 {_num(r['ttft_p50_ms'], '{:.1f}')}/{_num(r['ttft_p99_ms'], '{:.1f}')} ms, "
                         f"hit rate {_num(r.get('prefix_hit_rate'), '{:.0%}')}")
        else:
            lines.append(f"  {r['case']} (budget {r['budget']}): decode TPOT p50/p99/max {_num(r['tpot_p50_ms'], '{:.1f}')}/"
                         f"{_num(r['tpot_p99_ms'], '{:.1f}')}/{_num(r['tpot_max_ms'], '{:.1f}')} ms, "
                         f"long TTFT mean {_num(r['long_ttft_mean_ms'], '{:.0f}')} ms")
    return lines


def summary_lines(data: dict[str, Any]) -> list[str]:
    head = f"{data['bench']} on {_gpu(data)} ({data.get('date', '?')})"
    if data["bench"] in ("sft_vs_trl", "full_ft_mfu"):
        body = _sft_lines(data)
    elif data["bench"] == "engine_latency":
        body = _latency_lines(data)
    else:
        body = _generic_lines(data)
    return [head] + body[: MAX_ROWS + 6] + [f"  note: {n}"[:240] for n in data.get("notes", [])[:4]]


# --------------------------------------------------------------------------------------------
# BENCHMARKS.md rows
# --------------------------------------------------------------------------------------------
def _row(data: dict[str, Any], case: str, ours: str, baseline: str, ratio: str, target: str, met: bool | None) -> str:
    cells = [data.get("date", "?"), _gpu(data), f"`{data.get('commit', '?')}`", f"`{data.get('command', '?')}`", case, ours,
             baseline, ratio, target, {True: "yes", False: "**no**", None: "-"}[met]]
    return "| " + " | ".join(cells) + " |"


def markdown_rows(data: dict[str, Any]) -> list[str]:
    rows = {(r.get("shape"), r.get("method"), r.get("side")): r for r in data.get("rows", [])}
    if data["bench"] == "sft_vs_trl":
        out = []
        for c in data.get("comparisons", []):
            side = c.get("side", "ours")  # results written before variants existed compare "ours" only
            ours, base = rows[(c["shape"], c["method"], side)], rows[(c["shape"], c["method"], c["baseline"])]
            out.append(_row(
                data, f"{c['shape']} {c['method']} {'' if side == 'ours' else side + ' '}vs {c['baseline']}",
                f"{_num(ours['tokens_per_s'])} tok/s, {_num(ours.get('peak_mem_gib'), '{:.2f}')} GiB",
                f"{_num(base['tokens_per_s'])} tok/s, {_num(base.get('peak_mem_gib'), '{:.2f}')} GiB",
                f"{c['speedup']:.2f}x speed, {_num(c.get('mem_ratio'), '{:.2f}')}x mem", c.get("target") or "-", c.get("target_met")))
        return out
    if data["bench"] == "full_ft_mfu":
        target = data.get("target_mfu", 0.45)
        out = []
        for (shape, method, side), r in rows.items():
            if not _is_ours(side) or not r.get("tokens_per_s"):
                continue
            base = next((b for (s, m, bs), b in rows.items() if s == shape and not _is_ours(bs) and b.get("tokens_per_s")), None)
            mfu = lambda x: f"{x['mfu']:.1%} MFU ({_num(x['tokens_per_s'])} tok/s)" if x.get("mfu") is not None else f"{_num(x['tokens_per_s'])} tok/s"
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            out.append(_row(data, f"{shape} full FT bf16{'' if side == 'ours' else ' ' + side}", mfu(r), f"{base['side']}: {mfu(base)}" if base else "-", ratio,
                            f">= {target:.0%} MFU", r.get("target_met")))
        return out
    if data["bench"] == "engine_latency":
        return _latency_markdown(data)
    return []


LATENCY_PAIRS = (  # (on case, off case, metric, label, lower is better)
    ("prefix cache on", "prefix cache off", "ttft_p99_ms", "TTFT p99 (ms)", True),
    ("prefix cache on", "prefix cache off", "out_tok_per_s", "output tok/s", False),
    ("chunked prefill on", "chunked prefill off", "tpot_p99_ms", "decode TPOT p99 (ms)", True),
    ("chunked prefill on", "chunked prefill off", "tpot_max_ms", "decode TPOT max (ms)", True),
    ("chunked prefill on", "chunked prefill off", "long_ttft_mean_ms", "long-prompt TTFT mean (ms)", True),
)


def _latency_markdown(data: dict[str, Any]) -> list[str]:
    """One row per (feature, metric): the feature on ("ours") against off (the baseline), same call."""
    cases = {r.get("case"): r for r in data.get("rows", []) if not r.get("error")}
    out = []
    for on, off, key, label, lower in LATENCY_PAIRS:
        a, b = cases.get(on, {}).get(key), cases.get(off, {}).get(key)
        if a is None or b is None:
            continue
        ratio = (b / a if lower else a / b) if a and b else None  # > 1: the feature helps
        verdict = "-" if ratio is None else f"{ratio:.2f}x " + ("better with it on" if ratio >= 1 else "(worse with it on)")
        out.append(_row(data, f"{on.rsplit(' ', 1)[0]} on vs off: {label}", f"on: {a:,.1f}", f"off: {b:,.1f}", verdict, "-", None))
    return out


# --------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------
SIDE_COLORS = {"ours": "#1f77b4", "trl": "#ff7f0e", "trl_liger": "#2ca02c"}
VARIANT_COLORS = ("#9467bd", "#17becf", "#8c564b", "#e377c2")  # ours-NAME sides, in order of appearance


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (bench machines have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, title: str | None = None) -> Path:
    """Title (when given), lay out, write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def side_color(side: str, sides: list[str]) -> str | None:
    if side in SIDE_COLORS:
        return SIDE_COLORS[side]
    variants = [s for s in sides if s not in SIDE_COLORS]
    return VARIANT_COLORS[variants.index(side) % len(VARIANT_COLORS)] if side in variants else None


def latency_chart(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """engine_latency: TTFT with prefix caching on/off; the decode stall with chunked prefill on/off."""
    plt = _pyplot()

    cases = {r.get("case"): r for r in data.get("rows", []) if not r.get("error")}
    ttft = (("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99"))
    tpot = (("tpot_mean_ms", "TPOT mean"), ("tpot_p50_ms", "TPOT p50"), ("tpot_p99_ms", "TPOT p99"), ("tpot_max_ms", "TPOT max"))
    panels = [(("prefix cache on", "prefix cache off"), ttft, "shared system prompt: time to first token (ms)"),
              (("chunked prefill on", "chunked prefill off"), tpot, "long prompts during decode: decode gap (ms)")]
    panels = [p for p in panels if any(c in cases for c in p[0])]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), dpi=120, squeeze=False)
    for ax, (modes, metrics, title) in zip(axes[0], panels):
        width = 0.8 / len(modes)
        for j, mode in enumerate(m for m in modes if m in cases):
            r = cases[mode]
            extra = f", hit rate {r['prefix_hit_rate']:.0%}" if r.get("prefix_hit_rate") is not None else \
                f", long TTFT {r['long_ttft_mean_ms']:,.0f} ms" if r.get("long_ttft_mean_ms") is not None else ""
            xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(metrics))]
            ax.bar(xs, [r.get(key) or 0 for key, _ in metrics], width, label=mode + extra, color=("#1f77b4", "#ff7f0e")[j % 2])
        ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return [_save(fig, out_dir / "engine_latency.png",
                  f"engine_latency on {_gpu(data)} ({data.get('commit', '?')}, {data.get('shape', '?')})")]


def engine_chart(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """engine_throughput: output tokens/s per side (log scale, ratios to ours on the bars); batch-1 decode
    ms per token and GPU replay ms per variant against the roofline and the 1.3x target."""
    plt = _pyplot()

    rows = [r for r in data.get("rows", []) if isinstance(r, dict) and not r.get("error")]
    throughput = [r for r in rows if r.get("tok_per_s")]
    bs1 = [r for r in rows if r.get("roofline_ms")]
    panels = [p for p in (("throughput", throughput), ("bs1", bs1)) if p[1]]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.4), dpi=120, squeeze=False)
    for ax, (kind, panel_rows) in zip(axes[0], panels):
        if kind == "throughput":
            ours = next((r["tok_per_s"] for r in panel_rows if _is_ours(r.get("side"))), None)
            labels = ["\n".join([r["shape"], r["side"].replace("transformers ", "transformers\n")] + (["(partial)"] if r.get("partial") else []))
                      for r in panel_rows]
            bars = ax.bar(range(len(panel_rows)), [r["tok_per_s"] for r in panel_rows],
                          color=["#1f77b4" if _is_ours(r.get("side")) else "#7f7f7f" for r in panel_rows])
            for bar, r in zip(bars, panel_rows):
                if ours and not _is_ours(r.get("side")):
                    ax.annotate(f"ours {ours / r['tok_per_s']:.1f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(panel_rows)), labels, fontsize=7)
            ax.set_ylabel("output tokens/s (log)")
            ax.set_title("offline throughput, 256 requests", fontsize=10)
        else:
            variants = [k[len("step_ms_"):] for k in panel_rows[0] if k.startswith("step_ms_")]
            cases = [(r["shape"], v) for r in panel_rows for v in variants if r.get(f"step_ms_{v}") is not None]
            by_shape = {r["shape"]: r for r in panel_rows}
            xs = range(len(cases))
            ax.bar([x - 0.2 for x in xs], [by_shape[s][f"step_ms_{v}"] / by_shape[s]["roofline_ms"] for s, v in cases], 0.4,
                   label="ms per token (engine)", color="#1f77b4")
            ax.bar([x + 0.2 for x in xs], [by_shape[s][f"replay_ms_{v}"] / by_shape[s]["roofline_ms"] for s, v in cases], 0.4,
                   label="GPU replay alone", color="#aec7e8")
            ax.axhline(1.0, color="black", lw=1, label="roofline (weights / copy bandwidth)")
            ax.axhline(1.3, color="red", ls="--", lw=1, label="target 1.3x")
            ax.set_xticks(list(xs), [f"{s}\n{v}" for s, v in cases], fontsize=7, rotation=25 if len(cases) > 6 else 0,
                          ha="right" if len(cases) > 6 else "center")
            ax.set_ylabel("x roofline (lower is better)")
            ax.set_title("batch-1 greedy decode", fontsize=10)
            ax.legend(fontsize=7, loc="lower center", framealpha=0.9)
        ax.grid(axis="y", alpha=0.3)
    return [_save(fig, out_dir / f"{_name(data)}.png", f"{_name(data)} on {_gpu(data)} ({data.get('commit', '?')})")] \
        + stage_chart(data, out_dir)


def stage_chart(data: dict[str, Any], out_dir: Path, layer: int = 14) -> list[Path]:
    """engine_throughput's bs1 stage timeline: the kernels of one decoder layer (and the next layer's qkv)
    of a batch-1 replay as bars from their first program's start (pale: resident, waiting) and first
    release past ``gdc_wait`` (dark) to their last program's end, per shape."""
    plt = _pyplot()

    rows = [r for r in data.get("rows", []) if isinstance(r, dict) and (r.get("stage_timeline") or {}).get("spans")]
    if not rows:
        return []
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.6 * len(rows)), dpi=120, squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        spans = row["stage_timeline"]["spans"]
        launches = spans[5 * layer:5 * layer + 6]
        origin = launches[0]["first_start"]
        for i, span in enumerate(launches):
            y = len(launches) - 1 - i
            start, release, end = ((span[key] - origin) / 1e3 for key in ("first_start", "first_release", "last_end"))
            ax.barh(y, end - start, left=start, color="#c6dbef", height=0.6)
            ax.barh(y, end - release, left=release, color="#1f77b4", height=0.6)
            ax.annotate(f"{end - (launches[i - 1]['last_end'] - origin) / 1e3:.2f} us" if i else "", (end, y),
                        xytext=(3, -3), textcoords="offset points", fontsize=7)
        ax.set_yticks(range(len(launches)), [s["label"] for s in reversed(launches)], fontsize=7)
        ax.set_xlabel(f"us (layer {layer}; labels: stage = end after the previous kernel's end)", fontsize=8)
        ax.set_title(f"{row['shape']}: batch-1 replay, one decoder layer (replay {row['stage_timeline']['replay_ms']:.3f} ms)",
                     fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    return [_save(fig, out_dir / f"{_name(data)}-stages.png")]


def step_chart(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """dpo_step / grpo_step: seconds per optimizer step and peak memory per side (ratios to TRL on the bars)."""
    plt = _pyplot()

    rows = [r for r in data.get("rows", []) if isinstance(r, dict) and r.get("step_s")]
    if not rows:
        return []
    baseline = next((r for r in rows if not _is_ours(r["side"])), None)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120)
    for ax, key, label in ((axes[0], "step_s", "seconds per step (lower is better)"), (axes[1], "peak_gib", "peak memory (GiB)")):
        bars = ax.bar([r["side"] for r in rows], [r.get(key) or 0 for r in rows],
                      color=["#1f77b4" if _is_ours(r["side"]) else "#7f7f7f" for r in rows])
        for bar, r in zip(bars, rows):
            if baseline and r is not baseline and r.get(key) and baseline.get(key):
                ax.annotate(f"{r[key] / baseline[key]:.2f}x {baseline['side']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    return [_save(fig, out_dir / f"{_name(data)}.png", f"{_name(data)} on {_gpu(data)} ({data.get('commit', '?')})")]


def serve_chart(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """serve_gpu: offline throughput with 0/1/8/32 adapters relative to the base model (min-max over rounds as
    whiskers, the 0.75x target); online TTFT and TPOT percentiles per request rate."""
    plt = _pyplot()

    rows = [r for r in data.get("rows", []) if isinstance(r, dict) and not r.get("error")]
    offline = [r for r in rows if str(r.get("case", "")).startswith("offline") and r.get("vs_base") is not None]
    online = [r for r in rows if str(r.get("case", "")).startswith("online") and r.get("ttft_p50_ms") is not None]
    panels = [p for p in (("offline", offline), ("online", online)) if p[1]]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=120, squeeze=False)
    for ax, (kind, panel_rows) in zip(axes[0], panels):
        labels = [r["case"].replace(kind + " ", "") for r in panel_rows]
        if kind == "offline":
            values = [r["vs_base"] for r in panel_rows]
            low = [v - r.get("ratio_min", v) for v, r in zip(values, panel_rows)]
            high = [r.get("ratio_max", v) - v for v, r in zip(values, panel_rows)]
            ax.bar(labels, values, yerr=[low, high], capsize=4, color="#1f77b4")
            ax.axhline(0.75, color="red", ls="--", lw=1, label="target 0.75x base")
            ax.set_ylabel("output tokens/s relative to the base model")
            ax.set_title("offline multi-LoRA throughput (median of rounds; whiskers: min-max)", fontsize=9)
            ax.legend(fontsize=8)
        else:
            xs = range(len(panel_rows))
            for j, (key, label) in enumerate((("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99"),
                                              ("tpot_p50_ms", "TPOT p50"), ("tpot_p99_ms", "TPOT p99"))):
                ax.bar([x + (j - 1.5) * 0.2 for x in xs], [r.get(key) or 0 for r in panel_rows], 0.2, label=label)
            ax.set_xticks(list(xs), labels)
            ax.set_yscale("log")
            ax.set_ylabel("ms (log)")
            ax.set_title("HTTP server: latency per request rate", fontsize=9)
            ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return [_save(fig, out_dir / f"{_name(data)}.png", f"{_name(data)} on {_gpu(data)} ({data.get('commit', '?')})")]


def _bars(out_dir: Path, data: dict[str, Any], panels: list[tuple[list[str], list[float], str, float | None]]) -> list[Path]:
    """One bar panel per (labels, values, y label, dashed reference line or None); saved as the result's PNG."""
    plt = _pyplot()

    width = sum(max(4.5, 1.1 * len(labels)) for labels, *_ in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4), dpi=120, squeeze=False)
    for ax, (labels, values, ylabel, line) in zip(axes[0], panels):
        ax.bar(range(len(values)), values, color="#1f77b4")
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        if line is not None:
            ax.axhline(line, color="red", ls="--", lw=1)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    return [_save(fig, out_dir / f"{_name(data)}.png", f"{_name(data)} on {_gpu(data)} ({data.get('commit', '?')})")]


def distill_chart(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """distill_gpu: tokens/s and peak memory of SFT and each KD mode (dashed: the +15% memory target over SFT)."""
    rows = [r for r in data.get("rows", []) if r.get("tokens_per_s") and r.get("peak_mem_gib")]
    sft = next((r["peak_mem_gib"] for r in rows if r.get("case") == "sft"), None)
    if not rows:
        return []
    labels = [r["case"] for r in rows]
    return _bars(out_dir, data, [(labels, [r["tokens_per_s"] for r in rows], "tokens/s", None),
                                 (labels, [r["peak_mem_gib"] for r in rows], "peak GiB (dashed: 1.15x SFT)",
                                  1.15 * sft if sft else None)])


def export_chart(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """export_gpu: the engine's decode tokens/s with AWQ int4 weights relative to bf16, per shape and batch."""
    rows = [r for r in data.get("engine") or [] if r.get("vs_bf16")]
    if not rows:
        return []
    labels = [f"{r['shape']}\nbatch {r['batch']}" for r in rows]
    return _bars(out_dir, data, [(labels, [r["vs_bf16"] for r in rows], "AWQ int4 tokens/s / bf16 (dashed: parity)", 1.0)])


def chart(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """Throughput (and MFU or peak memory) bars per case and side; loss curves when there are any."""
    if data.get("bench") == "engine_latency":
        return latency_chart(data, out_dir)
    if data.get("bench") == "engine_throughput":
        return engine_chart(data, out_dir)
    if data.get("bench") in ("dpo_step", "grpo_step"):
        return step_chart(data, out_dir)
    if data.get("bench") == "serve_gpu":
        return serve_chart(data, out_dir)
    if data.get("bench") == "distill_gpu":
        return distill_chart(data, out_dir)
    if data.get("bench") == "export_gpu":
        return export_chart(data, out_dir)
    plt = _pyplot()

    measured = [r for r in data.get("rows", []) if isinstance(r, dict) and r.get("tokens_per_s")]
    if not measured:
        return []
    cases = list(dict.fromkeys(f"{r['shape']}\n{r['method']}" for r in measured))
    sides = list(dict.fromkeys(r["side"] for r in measured))
    second = ("mfu", "MFU (%)", 100.0) if any(r.get("mfu") is not None for r in measured) else ("peak_mem_gib", "peak memory (GiB)", 1.0)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(cases) * 2), 4.2), dpi=120)
    width = 0.8 / len(sides)
    for j, side in enumerate(sides):
        by_case = {f"{r['shape']}\n{r['method']}": r for r in measured if r["side"] == side}
        xs = [i + (j - (len(sides) - 1) / 2) * width for i in range(len(cases))]
        for ax, (key, scale) in zip(axes, (("tokens_per_s", 1.0), (second[0], second[2]))):
            values = [(by_case[c].get(key) or 0) * scale if c in by_case else 0 for c in cases]
            ax.bar(xs, values, width, label=side, color=side_color(side, sides))
    for ax, label in zip(axes, ("tokens/s (higher is better)", second[1])):
        ax.set_xticks(range(len(cases)), cases)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    if second[0] == "mfu" and data.get("target_mfu"):
        axes[1].axhline(100 * data["target_mfu"], color="red", ls="--", lw=1, label=f"target {data['target_mfu']:.0%}")
    axes[0].legend()
    axes[1].legend()
    paths = [_save(fig, out_dir / f"{data['bench']}.png", f"{data['bench']} on {_gpu(data)} ({data.get('commit', '?')})")]

    curves = [r for r in measured if r.get("losses")]
    if curves:
        fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.6), dpi=120, squeeze=False)
        for ax, case in zip(axes[0], cases):
            for r in (r for r in curves if f"{r['shape']}\n{r['method']}" == case):
                ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["side"], color=side_color(r["side"], sides), lw=1.2)
            ax.set_title(case.replace("\n", " "))
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend()
        axes[0][0].set_ylabel("training loss")
        paths.append(_save(fig, out_dir / f"{data['bench']}-loss.png"))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="a few lines per result file")
    s.add_argument("files", nargs="+", type=Path)
    r = sub.add_parser("render", help="PNG charts + markdown rows for BENCHMARKS.md")
    r.add_argument("files", nargs="+", type=Path)
    r.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)

    results = []
    for path in args.files:
        try:
            results.append(load(path))
        except (OSError, json.JSONDecodeError) as e:
            print(f"{path}: unreadable ({type(e).__name__}: {e})", file=sys.stderr)
    if args.command == "summary":
        for data in results:
            print("\n".join(summary_lines(data)))
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sections = {}
    for data in results:
        pngs = chart(data, args.out_dir)
        rows = markdown_rows(data)
        section = [f"### {_name(data)}", ""]
        if rows:
            section += [TABLE_HEADER, *rows, ""]
        section += [f"![{p.stem}]({p.name})" for p in pngs] + [""]
        sections[_name(data)] = "\n".join(section)
        for png in pngs:
            print(f"wrote {png}")
    tables = args.out_dir / "tables.md"
    merge_tables(tables, sections)
    print(f"wrote {tables}")
    print("\n".join(sections.values()))
    return 0


def merge_tables(path: Path, sections: dict[str, str]) -> str:
    """Write ``path`` with one section per result name: those rendered now replace their namesakes, every
    other section already there stays (rendering one result must not drop the others' tables)."""
    kept: dict[str, str] = {}
    if path.exists():
        for block in re.split(r"(?m)^(?=### )", path.read_text()):
            if block.startswith("### "):
                kept[block.splitlines()[0][4:].strip()] = block.rstrip("\n") + "\n"
    kept.update({name: text.rstrip("\n") + "\n" for name, text in sections.items()})
    text = "\n".join(kept.values())
    path.write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
