"""The GPU bench scripts' code paths, on CPU with a tiny model (``--smoke``), so they do not rot.

Speed numbers on CPU mean nothing; what is checked is that each side trains on the same data from
the same weights, the JSON carries what BENCHMARKS.md needs, and the runner/summary/charts work.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import charts, common  # noqa: E402


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


def test_sft_vs_trl_smoke_trains_both_sides_on_the_same_data(tmp_path):
    out = tmp_path / "sft.json"
    proc = _run([sys.executable, "bench/sft_vs_trl.py", "--smoke", "--methods", "lora", "--sides", "ours,trl", "--out", str(out),
                 "--workdir", str(tmp_path / "w")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["side"]: r for r in data["rows"]}
    assert set(rows) == {"ours", "trl"}
    for side, r in rows.items():
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and len(r["losses"]) == 3, side  # 1 warm-up + 2 measured steps
        assert 9.0 < r["losses"][0] < 12.0, side  # ~ln(49152) = 10.8: the same random init on both sides
    # the same LoRA config on the same model: identical trainable parameter counts
    assert rows["ours"]["trainable_params"] == rows["trl"]["trainable_params"]
    (comparison,) = data["comparisons"]
    assert comparison["baseline"] == "trl" and comparison["speedup"] > 0
    assert data["command"].startswith("python bench/sft_vs_trl.py") and data["env"]["torch"]
    assert "crucible vs baseline" in proc.stdout  # the table prints last
    md = charts.markdown_rows(data)
    assert len(md) == 1 and "tiny lora vs trl" in md[0] and md[0].count("|") == 11


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
