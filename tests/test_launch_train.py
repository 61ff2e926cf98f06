"""launch/train.py as a user runs it: config errors, dry runs, and a torchrun end-to-end run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}


def launch(*args: str, cwd: Path = ROOT, timeout: int = 300, runner: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    return subprocess.run([*runner, str(ROOT / "launch" / "train.py"), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_typo_in_key_names_the_key_exit_2_no_traceback(tmp_path):
    out = launch("config=qlora.yaml", "lora.rnak=8", cwd=tmp_path)  # outside the repo: no install needed
    assert out.returncode == 2
    assert "lora.rank" in out.stderr and out.stderr.startswith("error: ")
    assert "Traceback" not in out.stderr + out.stdout


def test_bad_value_exit_2():
    out = launch("config=qlora.yaml", "train.optimizer=sgd")
    assert out.returncode == 2 and "train.optimizer" in out.stderr and "Traceback" not in out.stderr


def test_dry_run_prints_config_and_memory_estimate(tmp_path):
    out = launch("config=qlora.yaml", "dry_run=true", f"output_dir={tmp_path / 'never'}")
    assert out.returncode == 0, out.stderr
    assert "load_in_4bit: true" in out.stdout  # the resolved config
    for row in ("weights", "gradients", "optimizer", "activations", "total"):
        assert row in out.stdout.lower(), row
    assert not (tmp_path / "never").exists()  # a dry run trains and writes nothing


@pytest.mark.slow
def test_torchrun_end_to_end(tiny_llama_dir, tmp_path):
    """torchrun, 1 process: trains, writes config/metrics/checkpoint/final adapter, ends with the summary table."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    out_dir = tmp_path / "run"
    out = launch("config=lora.yaml", f"model.path={tiny_llama_dir}", f"output_dir={out_dir}", "train.max_steps=4",
                 "train.seq_len=128", "data.num_samples=64", "data.template_check=false", "eval.every_n_steps=2",
                 "checkpoint.every_n_steps=2", runner=(torchrun, "--nproc_per_node=1", "--master_port=0"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training summary" in out.stderr
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert (out_dir / "final" / "adapter_model.safetensors").is_file()
    assert (out_dir / "checkpoints" / "step-000004" / "trainer_state.json").is_file()
    assert "lora:" in (out_dir / "config.yaml").read_text()


def test_every_shipped_config_validates(tmp_path):
    """Each recipe in configs/ loads (with its ``extends`` chain) and passes validation as shipped."""
    from trainer.config import load_config

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"qlora.yaml", "qlora_gpu.yaml", "lora.yaml", "dpo.yaml", "grpo.yaml"}
    for path in configs:
        if path.name == "sweep.yaml":  # a W&B sweep definition, not a training config
            continue
        cfg = load_config([f"config={path}", f"output_dir={tmp_path / path.stem}"])
        assert cfg.train.max_steps > 0, path.name
    gpu = load_config([f"config={ROOT / 'configs' / 'qlora_gpu.yaml'}"])
    assert gpu.train.compile and gpu.train.mlp_token_chunks == 4 and gpu.quant.load_in_4bit and gpu.precision == "bf16"
