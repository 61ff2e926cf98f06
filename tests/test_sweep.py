"""Sweeps: sweep-file validation, the offline controller end to end, leaderboard, the W&B agent boundary."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer import sweep as sweeps
from trainer.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model.init": "random", "model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1,
    "model.intermediate_size": 64, "train.seq_len": 64, "train.micro_batch_size": 4, "data.num_samples": 64,
    "data.template_check": False, "lora.enabled": False, "precision": "fp32", "eval.every_n_steps": 2, "eval.max_batches": 2,
    "checkpoint.save_final": False,
}


def write_sweep(tmp_path: Path, **over) -> Path:
    base = tmp_path / "tiny_base.yaml"
    tree: dict = {}
    for k, v in TINY.items():
        node = tree
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    tree.setdefault("train", {})["max_steps"] = 4
    tree["train"]["scheduler"] = "constant"
    base.write_text(yaml.safe_dump(tree))
    spec = {"config": str(base), "method": "grid", "metric": {"name": "val_loss", "goal": "minimize"},
            "parameters": {"train.lr": {"values": [1e-4, 3e-2]}, "train.weight_decay": {"values": [0.0, 0.1]}}}
    spec.update(over)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    "over, message",
    [
        ({"parameters": {"lora.rnak": {"values": [4, 8]}}}, "did you mean 'lora.rank'"),
        ({"parameters": {"train.lr": {"distribution": "log_normalish", "min": 1e-5, "max": 1e-3}}, "method": "random", "count": 2}, "unknown distribution"),
        ({"parameters": {"train.lr": {"values": []}}}, "empty values"),
        ({"parameters": {}}, "parameters is empty"),
        ({"parameters": {"train.lr": {"distribution": "log_uniform_values", "min": 0, "max": 1e-3}}, "method": "random", "count": 2}, "min > 0"),
        ({"parameters": {"train.lr": {"distribution": "uniform", "min": 1e-5, "max": 1e-3}}}, "method=grid needs values"),
        ({"method": "random"}, "needs count"),
        ({"metric": {"name": "val_loss", "goal": "up"}}, "minimize or maximize"),
        ({"parameters": {"train.max_steps": {"values": ["many"]}}}, "train.max_steps must be an integer"),
    ],
)
def test_bad_sweep_files_fail_before_any_trial(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        sweeps.load_sweep(str(write_sweep(tmp_path, **over)))


def test_grid_and_random_suggestions_cover_the_space(tmp_path):
    spec = sweeps.load_sweep(str(write_sweep(tmp_path)))
    suggest = sweeps.suggestions(spec)
    seen = []
    while (p := suggest([None] * len(seen))) is not None:
        seen.append(p)
    assert len(seen) == 4 and {(s["train.lr"], s["train.weight_decay"]) for s in seen} == {(1e-4, 0.0), (1e-4, 0.1), (3e-2, 0.0), (3e-2, 0.1)}
    spec = sweeps.load_sweep(str(write_sweep(tmp_path, method="random", count=5, parameters={
        "train.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2}, "lora.rank": {"values": [4, 8]}})))
    draws = [sweeps.suggestions(spec)([None] * i) for i in range(5)]
    assert all(1e-5 <= d["train.lr"] <= 1e-2 and d["lora.rank"] in (4, 8) for d in draws)


def test_leaderboard_orders_best_first():
    rows = [
        {"trial": "t0", "status": "completed", "metric": 2.0},
        {"trial": "t1", "status": "failed", "metric": None},
        {"trial": "t2", "status": "completed", "metric": 1.5},
        {"trial": "t3", "status": "early_stopped", "metric": 1.0},
    ]
    assert [r["trial"] for r in sweeps.leaderboard(rows, "minimize")] == ["t2", "t0", "t3"]
    assert [r["trial"] for r in sweeps.leaderboard(rows, "maximize")] == ["t0", "t2", "t3"]


def test_agent_callback_builds_the_trial_command(tmp_path):
    """The online path up to the W&B boundary: the agent reads params + run id and launches one torchrun."""
    spec = sweeps.load_sweep(str(write_sweep(tmp_path, parameters={"train.lr": {"values": [0.001]}, "lora.rank": {"values": [8]}})))

    class FakeRun:
        config = {"train.lr": 0.001, "lora.rank": 8}
        id = "abc123"

    class FakeWandb:
        calls: list[str] = []

        def init(self):
            self.calls.append("init")
            return FakeRun()

        def finish(self):
            self.calls.append("finish")

    launched = []
    fake = FakeWandb()
    callback = sweeps.make_agent_callback(spec, tmp_path / "sw", "sweep-xyz", fake, runner=lambda cmd: launched.append(cmd) or 0)
    callback()
    (cmd,) = launched
    assert fake.calls == ["init", "finish"], "the agent must release the run before the trial's rank 0 re-opens it"
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and cmd[5].endswith("launch/train.py")
    assert "train.lr=0.001" in cmd and "lora.rank=8" in cmd and "wandb.id=abc123" in cmd
    assert "wandb.group=sweep-xyz" in cmd and "resume=auto" in cmd and "wandb.log_model=true" in cmd
    # the command's overrides form a valid config (what the trial will actually run)
    overrides = [a for a in cmd[6:] if "=" in a]
    cfg = load_config(overrides)
    assert cfg.train.lr == 0.001 and cfg.lora.rank == 8 and cfg.wandb.id == "abc123"


def test_hyperband_stops_a_trial_behind_the_others(tmp_path):
    spec = sweeps.load_sweep(str(write_sweep(tmp_path, early_terminate={"type": "hyperband", "min_iter": 2, "eta": 2})))
    ctl = sweeps.LocalController(spec, tmp_path / "sw")
    good = sweeps.Trial(0, {}, tmp_path / "a", status="completed", history=[(2, 1.0), (4, 0.8)])
    bad = sweeps.Trial(1, {}, tmp_path / "b", status="running", history=[(2, 3.0)])
    ok = sweeps.Trial(2, {}, tmp_path / "c", status="running", history=[(2, 0.9)])
    ctl.trials = [good, bad, ok]
    assert ctl._should_stop(bad) and not ctl._should_stop(ok)
    assert spec.early_terminate.brackets(20) == [2, 4, 8, 16]


@pytest.mark.slow
def test_offline_sweep_of_four_trials_end_to_end(tmp_path):
    sweep_file = write_sweep(tmp_path)
    out = tmp_path / "sweep-out"
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "launch/sweep.py"), f"sweep={sweep_file}", f"output_dir={out}"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    for r in rows:  # each trial's resolved config matches its overrides
        resolved = yaml.safe_load((Path(r["output_dir"]) / "config.yaml").read_text())
        assert resolved["train"]["lr"] == pytest.approx(r["param.train.lr"])
        assert resolved["train"]["weight_decay"] == pytest.approx(r["param.train.weight_decay"])
        assert resolved["wandb"]["group"] == json.loads((out / "sweep.json").read_text())["id"]
        assert list(Path(r["output_dir"]).glob("wandb/offline-run-*")), "each trial logs an offline W&B run"
    best = sweeps.leaderboard(rows, "minimize")[0]
    assert best["metric"] == min(r["metric"] for r in rows)
    assert (out / "sweep.png").is_file() and (out / "trials.csv").is_file()
    report = subprocess.run([sys.executable, str(ROOT / "launch/sweep.py"), "report", f"sweep_dir={out}"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert report.returncode == 0 and best["trial"] in report.stdout
