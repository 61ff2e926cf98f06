"""Under torchrun, only rank 0 ever creates a W&B run (elsewhere: one run per GPU, duplicated sweeps)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_only_rank_zero_initializes_wandb_under_torchrun(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py",
           f"model.path={tiny_llama_dir}", f"output_dir={out}", "parallel.strategy=ddp", "precision=fp32",
           "data.num_samples=64", "data.template_check=false", "train.seq_len=64", "train.micro_batch_size=2",
           "train.max_steps=2", "eval.every_n_steps=0", "data.val_fraction=0", "wandb.enabled=true", "lora.rank=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected exactly one W&B run for 2 ranks, found {[r.name for r in runs]}"
