"""End to end: ``torchrun --nproc_per_node=2 launch/train.py config=qlora.yaml parallel.strategy=...`` on CPU.

The 2-rank QLoRA runs (micro-batch 2 per rank) must log the same losses as one process with
micro-batch 4 (the loader shards each global batch across ranks), and leave a loadable adapter.
fp32 so that only the order of the cross-rank sums differs (rtol 1e-5). ``quant.quant_storage`` is left
at ``auto``, which packs NF4 into the sharded parameter dtype: the exact command a user types works.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train(model_dir: str, out: Path, nproc: int, *overrides: str) -> list[float]:
    args = ["config=qlora.yaml", f"model.path={model_dir}", "train.seq_len=64", "train.max_steps=3", "train.warmup_steps=0",
            "data.num_samples=64", "data.val_fraction=0", "checkpoint.every_n_steps=0", "precision=fp32",
            f"train.micro_batch_size={4 // nproc}", f"output_dir={out}", "parallel.timeout_s=120",
            *overrides]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([*launcher, "launch/train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def single_losses(tiny_llama_dir, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return _train(tiny_llama_dir, tmp_path_factory.mktemp("single"), 1)


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_torchrun_qlora_matches_single_process(strategy, single_losses, tiny_llama_dir, tmp_path):
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    losses = _train(tiny_llama_dir, tmp_path, 2, f"parallel.strategy={strategy}")
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert losses == pytest.approx(single_losses, rel=1e-5)
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "final")
    assert any("lora_B" in n and p.abs().max() > 0 for n, p in model.named_parameters())


def test_mismatched_quant_storage_is_refused_before_launching_workers(tiny_llama_dir, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "launch/train.py", "config=qlora.yaml", f"model.path={tiny_llama_dir}",
                           "parallel.strategy=fsdp2", "quant.quant_storage=uint8", f"output_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: quant.quant_storage=uint8 with parallel.strategy=fsdp2" in proc.stderr
    assert "Traceback" not in proc.stderr
