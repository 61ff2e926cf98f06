"""The GPU bench scripts' code paths, on CPU with a tiny model (``--smoke``), so they do not rot.

Speed numbers on CPU mean nothing; what is checked is that each side trains on the same data from
the same weights, the JSON carries what BENCHMARKS.md needs, and the runner/summary/charts work.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import charts, common, engine_latency, sft_vs_trl  # noqa: E402


def test_shapes_match_published_parameter_counts():
    """The random-init shapes are the real models' (minus the vocabulary swap, which is reported)."""
    tok = common.load_tokenizer()
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    smollm2 = common.hf_config("smollm2-135m", tok)
    assert common.parameter_counts(smollm2)["total"] == 134_515_008  # HuggingFaceTB/SmolLM2-135M
    llama = common.hf_config("llama-3.2-1b", tok)
    # Llama-3.2-1B has 1,235,814,400 parameters with its 128,256-token tied embedding
    assert common.parameter_counts(llama)["total"] + (128256 - 49152) * 2048 == 1_235_814_400
    assert llama.rope_parameters["rope_type"] == "llama3"
    assert "128256" in common.vocab_note("llama-3.2-1b") and common.vocab_note("smollm2-135m") == ""
    with pytest.raises(SystemExit, match="unknown --shape"):
        common.hf_config("gpt-5")


def test_corpus_documents_fit_one_sequence_and_are_deterministic():
    tok = common.load_tokenizer()
    docs = common.corpus_documents(tok, num_tokens=3000, max_doc_tokens=255, seed=3)
    lengths = [len(ids) + 1 for ids in tok(docs)["input_ids"]]  # + the eos each trainer appends
    assert sum(lengths) >= 3000 and max(lengths) <= 255 and len(set(lengths)) > 3
    assert docs == common.corpus_documents(tok, num_tokens=3000, max_doc_tokens=255, seed=3)


def test_real_tokens_excludes_trailing_padding():
    import torch

    batch = {  # row 0: docs of 3 and 2 tokens + 3 pad; row 1: full, no pad
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]),
        "labels": torch.tensor([[-100, 5, 6, -100, 8, -100, -100, -100], [-100, 1, 2, 3, -100, 1, 2, 3]]),
    }
    assert common.real_tokens(batch) == 5 + 8


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_sft_vs_trl_smoke_trains_every_side_on_the_same_data(tmp_path):
    """ours, one --ours-variants side and TRL; the variant is compared with TRL and with the default side."""
    out = tmp_path / "sft.json"
    proc = _run([sys.executable, "bench/sft_vs_trl.py", "--smoke", "--methods", "lora", "--sides", "ours,trl", "--out", str(out),
                 "--workdir", str(tmp_path / "w"), "--ours-variants", "plain_ce=train.loss_chunk_size=0"], timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["side"]: r for r in data["rows"]}
    assert list(rows) == ["ours", "trl", "ours-plain_ce"]  # baselines first: a time budget never cuts them
    for side, r in rows.items():
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 3, side  # 1 warm-up + 2 measured steps
        assert 9.0 < r["losses"][0] < 12.0, side  # ~ln(49152) = 10.8: the same random init on every side
    assert rows["ours-plain_ce"]["overrides"] == ["train.loss_chunk_size=0"] and rows["ours"]["overrides"] == []
    # the same LoRA config on the same model: identical trainable parameter counts
    assert rows["ours"]["trainable_params"] == rows["ours-plain_ce"]["trainable_params"] == rows["trl"]["trainable_params"]
    pairs = {(c["side"], c["baseline"]): c for c in data["comparisons"]}
    assert set(pairs) == {("ours", "trl"), ("ours-plain_ce", "trl"), ("ours-plain_ce", "ours")}
    assert all(c["speedup"] > 0 for c in pairs.values())
    assert pairs[("ours-plain_ce", "ours")]["target_met"] is None  # the 2x target is against TRL only
    assert data["command"].startswith("python bench/sft_vs_trl.py") and data["env"]["torch"]
    assert "crucible vs baseline" in proc.stdout  # the table prints last
    md = charts.markdown_rows(data)
    assert len(md) == 3 and "tiny lora vs trl" in md[0] and "tiny lora ours-plain_ce vs ours" in md[2]
    assert all(row.count("|") == 11 for row in md)


def test_ours_variants_parse_and_fail_fast_on_unknown_keys(tmp_path):
    parsed = sft_vs_trl.parse_variants("compiled=train.compile=true; narrow=lora.target_modules=q_proj,v_proj,train.compile=true")
    assert parsed == {"compiled": ["train.compile=true"], "narrow": ["lora.target_modules=q_proj,v_proj", "train.compile=true"]}
    for bad, message in (("compiled", "want NAME=key=value"), ("a=x=1;a=y=2", "given twice"), ("v=train.compile", "not key=value")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            sft_vs_trl.parse_variants(bad)
    # a misspelt key exits 2 with the config error before any corpus or model is built
    proc = _run([sys.executable, "bench/sft_vs_trl.py", "--smoke", "--ours-variants", "fast=train.compil=true",
                 "--workdir", str(tmp_path / "w")], timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--ours-variants fast (lora): unknown config key 'train.compil'; did you mean 'train.compile'?" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_time_budget_records_sides_that_cannot_start_as_skipped(tmp_path):
    out = tmp_path / "full.json"
    proc = _run([sys.executable, "bench/full_ft_mfu.py", "--smoke", "--time-budget", "0", "--out", str(out),
                 "--workdir", str(tmp_path / "w")], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["side"] for r in rows] == ["ours", "trl"]
    assert all(r["skipped"].startswith("time budget") and "tokens_per_s" not in r for r in rows)
    assert "skipped: time budget" in proc.stdout  # named under the table


def test_chunked_ce_smoke_writes_json_and_agrees(tmp_path):
    out = tmp_path / "ce.json"
    proc = _run([sys.executable, "bench/chunked_ce_gpu.py", "--smoke", "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["all_agree"] and [r["case"] for r in data["rows"]] == ["plain", "chunk 256", "chunk 128"]
    assert len({round(r["loss_per_token"], 4) for r in data["rows"]}) == 1  # chunking never changes the loss


def test_latency_metrics_from_token_timestamps():
    """TPOT gaps count from the first long arrival on; TTFT is first token minus arrival."""
    Trace = engine_latency.Trace
    traces = {"0": Trace("decoder", 0.0, [0.1, 0.2, 0.3, 0.9, 1.0]), "1": Trace("long", 0.25, [0.9, 1.0])}
    m = engine_latency.stall_metrics(traces)
    assert m["tpot_max_ms"] == 600.0 and m["decode_tokens_in_window"] == 3 and m["tpot_p50_before_ms"] == 100.0
    assert m["long_ttft_mean_ms"] == 650.0 and m["long_finished"] == 1
    assert engine_latency.percentile([1, 2, 3, 4], 50) == 2.5 and engine_latency.percentile([], 99) is None
    burst = engine_latency.shared_prompt_workload(5, system_tokens=40, output_tokens=3)
    assert len({tuple(a.prompt[:40]) for a in burst}) == 1 and len({tuple(a.prompt) for a in burst}) == 5


def test_live_timeline_splits_gpu_time_into_busy_and_idle():
    """Overlapping kernels count once as busy time; gaps under 5 us are launch spacing, longer ones the
    GPU waiting (the split the batch-1 bench uses to explain a step's excess over its graph replay)."""
    from bench.engine_throughput import timeline_stats

    stats = timeline_stats([(40, 50), (0, 10), (5, 12), (14, 20)], tokens=2)  # unsorted, one overlap
    assert stats["busy_ms_per_token"] == (12 + 6 + 10) / 2e3
    assert stats["idle_short_ms_per_token"] == 2 / 2e3 and stats["idle_long_ms_per_token"] == 20 / 2e3
    assert stats["gaps_over_5us"] == 1 and stats["largest_gaps_us"] == [2, 20]


def test_engine_latency_smoke_measures_both_features(tmp_path):
    out = tmp_path / "lat.json"
    proc = _run([sys.executable, "bench/engine_latency.py", "--smoke", "--out", str(out), "--workdir", str(tmp_path / "w")], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["case"]: r for r in data["rows"]}
    assert list(rows) == ["prefix cache on", "prefix cache off", "chunked prefill on", "chunked prefill off"]
    # 64 shared tokens of each ~100-token prompt are 4 full blocks: every request after the first finds them
    assert rows["prefix cache on"]["prefix_hit_rate"] > 0.3 and rows["prefix cache off"]["prefix_hit_rate"] == 0
    for case in ("prefix cache on", "prefix cache off"):
        assert rows[case]["requests"] == 4 and rows[case]["output_tokens"] == 4 * 4 and rows[case]["ttft_p99_ms"] > 0
    for case in ("chunked prefill on", "chunked prefill off"):
        assert rows[case]["long_finished"] == rows[case]["long_requests"] == 2 and rows[case]["tpot_max_ms"] > 0
    assert rows["chunked prefill on"]["budget"] == 32 and rows["chunked prefill off"]["budget"] >= 96
    assert "(b) 3 decoding requests" in proc.stdout  # the tables print last
    assert [p.name for p in charts.chart(data, tmp_path)] == ["engine_latency.png"]
    assert len(charts.markdown_rows(data)) == len(charts.LATENCY_PAIRS)  # every on-vs-off pair has both numbers


def test_run_gpu_sh_runs_entries_with_timeouts_and_summarizes(tmp_path):
    """run_gpu.sh: a real entry (full FT smoke, ours only, with --profile), a bad entry, then the summary."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/run_gpu.sh", "full_ft_mfu@smoke:200:--smoke --sides ours --profile", "no_such_bench:10"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=260)
    assert proc.returncode == 1, proc.stdout[-3000:]  # one failed entry
    assert "full_ft_mfu-smoke: ok" in proc.stdout and "no_such_bench: bad entry" in proc.stdout
    data = json.loads((tmp_path / "full_ft_mfu-smoke.json").read_text())
    (row,) = data["rows"]
    assert row["side"] == "ours" and row["method"] == "full" and row["tokens_per_s"] > 0
    assert row["top_ops"] and {"op", "self_ms", "pct"} <= set(row["top_ops"][0])  # --profile: top ops recorded
    assert "full_ft_mfu on cpu" in proc.stdout  # the compact summary at the end
    pngs = charts.chart(data, tmp_path)
    assert [p.name for p in pngs] == ["full_ft_mfu.png", "full_ft_mfu-loss.png"] and all(p.stat().st_size > 1000 for p in pngs)


def test_streams_sh_runs_each_stream_on_its_gpus_and_packs_one_archive(tmp_path):
    """streams.sh: one stream per CUDA_VISIBLE_DEVICES prefix, KEY=VALUE prefixes set env, one archive back, summaries last."""
    plan = tmp_path / "plan.txt"
    plan.write_text("# a comment\n0|no_such_bench:10\n\n1,2|FOO=bar no_such_other:10\n0|also_missing:10\n")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "bench/streams.sh", str(plan)], cwd=ROOT, env=dict(os.environ, OUT=str(out), PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout  # both streams had a failed entry
    assert "##### GPUs 0" in proc.stdout and "##### GPUs 1,2" in proc.stdout
    assert "no_such_other: bad entry 'no_such_other:10'" in proc.stdout  # the env prefix is not part of the entry
    import tarfile

    with tarfile.open(out / "results.tgz") as archive:
        names = set(archive.getnames())
    assert {"results/0/stream.log", "results/1-2/stream.log"} <= names
    assert not (out / "results").exists()  # everything is in the archive


def test_fp8_curves_are_judged_against_the_bf16_reseed_noise_band():
    """FP8 'matches' when its smoothed gap to bf16 stays within 1.5x the bf16-vs-bf16-reseed gap after the warm-up phase."""
    import math

    from bench import fp8_gpu

    steps = 200
    bf16 = [0.5 + 11 * math.exp(-i / 20) for i in range(steps)]
    reseed = [x * (1 + 0.10 * math.sin(i / 7)) for i, x in enumerate(bf16)]  # ~10% drift: the noise band

    def run(losses, tokens_per_s):
        return {"losses": losses, "tokens_per_s": tokens_per_s, "peak_gib": 1.0, "compile_warmup_s": 1.0, "fp8_linears": 4}

    close = [x * (1 + 0.05 * math.cos(i / 5)) for i, x in enumerate(bf16)]
    far = [x * 1.3 for x in bf16]
    rows = {r["case"]: r for r in fp8_gpu.compare({"bf16": run(bf16, 100.0), "bf16-reseed": run(reseed, 101.0),
                                                   "fp8-tensorwise": run(close, 130.0), "fp8-rowwise": run(far, 140.0)})}
    band = rows["bf16-reseed"]["max_rel_gap_after_skip"]
    assert 0.05 < band < 0.11 and rows["fp8-tensorwise"]["gap_tolerance"] == pytest.approx(1.5 * band, abs=1e-4)
    assert rows["fp8-tensorwise"]["curves_match"] and rows["fp8-tensorwise"]["target_met"]  # 1.30x and inside the band
    assert not rows["fp8-rowwise"]["curves_match"] and not rows["fp8-rowwise"]["target_met"]  # 1.40x but 30% off
    alone = {r["case"]: r for r in fp8_gpu.compare({"bf16": run(bf16, 100.0), "fp8-tensorwise": run(close, 130.0)})}
    assert alone["fp8-tensorwise"]["gap_tolerance"] == fp8_gpu.CURVE_TOLERANCE  # no reseed run: the fixed tolerance


def test_engine_throughput_smoke_runs_both_transformers_baselines(tmp_path):
    """The engine and transformers' static and continuous-batching sides decode exactly the requested tokens."""
    out = tmp_path / "engine.json"
    proc = _run([sys.executable, "bench/engine_throughput.py", "--smoke", "--sections", "throughput,hf,hf_cb", "--out", str(out),
                 "--workdir", str(tmp_path / "w")], timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["side"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"crucible engine", "transformers generate", "transformers continuous batching"}
    requested = rows["crucible engine"]["output_tokens"]
    for side, r in rows.items():
        assert "error" not in r, (side, r.get("error"))
        assert r["requests"] == 6 and r["output_tokens"] == requested and not r.get("partial"), side
    assert rows["crucible engine"]["speedup_vs_hf_cb"] > 0
    assert [p.name for p in charts.chart(charts.load(out), tmp_path)] == ["engine.png"]


def test_step_and_serving_charts(tmp_path):
    """DPO/GRPO step charts (time and memory per side) and the serving chart (offline ratios, online latency)."""
    step = {"bench": "dpo_step", "rows": [{"side": "ours", "step_s": 0.5, "peak_gib": 1.5},
                                          {"side": "trl", "step_s": 0.6, "peak_gib": 0.9}]}
    serve = {"bench": "serve_gpu", "file_stem": "serve_gpu-x", "rows": [
        {"case": "offline base", "out_tok_per_s": 100.0, "vs_base": 1.0},
        {"case": "offline 8 adapters", "out_tok_per_s": 90.0, "vs_base": 0.9, "ratio_min": 0.8, "ratio_max": 1.0},
        {"case": "online 8 req/s", "ttft_p50_ms": 10.0, "ttft_p99_ms": 30.0, "tpot_p50_ms": 3.0, "tpot_p99_ms": 5.0}]}
    assert [p.name for p in charts.chart(step, tmp_path)] == ["dpo_step.png"]
    assert [p.name for p in charts.chart(serve, tmp_path)] == ["serve_gpu-x.png"]
    distill = {"bench": "distill_gpu", "rows": [{"case": "sft", "tokens_per_s": 10.0, "peak_mem_gib": 1.0},
                                                {"case": "kd-offline", "tokens_per_s": 8.0, "peak_mem_gib": 1.1}]}
    export = {"bench": "export_gpu", "rows": [], "engine": [{"shape": "s", "batch": 1, "weights": "awq int4", "tok_per_s": 9.0,
                                                            "vs_bf16": 1.3}]}
    assert [p.name for p in charts.chart(distill, tmp_path) + charts.chart(export, tmp_path)] == ["distill_gpu.png", "export_gpu.png"]
    assert all(p.stat().st_size > 1000 for p in tmp_path.glob("*.png"))


def test_rendered_tables_keep_the_other_results(tmp_path):
    """``charts.py render`` of one result replaces that result's section of tables.md and keeps the others'."""
    tables = tmp_path / "tables.md"
    charts.merge_tables(tables, {"a": "### a\n\nfirst a\n", "b": "### b\n\nfirst b\n"})
    text = charts.merge_tables(tables, {"a": "### a\n\nsecond a\n"})
    assert "second a" in text and "first a" not in text and "first b" in text
    assert text.index("### a") < text.index("### b")  # the sections keep their order


def test_bs1_variants_only_name_switches_the_model_runner_knows():
    """The bs1 variants reach ``ModelRunner.set_kernels`` on a GPU only: a misspelt switch would cost a GPU call."""
    from bench.engine_throughput import KERNEL_SWITCHES, VARIANTS
    from engine.model_runner import KERNEL_SETTERS

    known = {"gemv", *KERNEL_SETTERS}
    assert set(KERNEL_SWITCHES) == known
    engine_config = {"decode_steps", "pipeline_rounds"}
    assert all(set(changes) <= known | engine_config for _, changes in VARIANTS)
