"""Everything a run reports: progress bar, ``metrics.jsonl``, W&B, the summary table, ``loss.png``.

Only rank 0 reports; other ranks get a ``MetricsLogger`` whose methods do nothing, so the loop has
no ``if rank == 0`` branches.
"""
from __future__ import annotations

import json
import math
import netrc
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from trainer.config import REPO_ROOT, Config, to_dict

# Dense bf16 tensor-core peak per device (vendor datasheets, no sparsity). Matched as substrings of
# torch.cuda.get_device_name(); more specific names come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of ``device`` when it is in the table (None on CPU and unknown GPUs: no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def training_flops_per_token(num_params: int) -> float:
    """6·N: forward 2N + backward 4N multiply-adds per token (Kaplan et al.; attention FLOPs ignored)."""
    return 6.0 * num_params


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated device memory on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def wandb_mode(requested: str) -> str:
    """``auto`` is online only when a W&B API key is configured (env var or ~/.netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def read_history(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; with ``up_to_step``, only those at or before it (for a resume)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if up_to_step is None or r.get("step", 0) <= up_to_step]


class MetricsLogger:
    """Writes one JSON object per logged step and mirrors it to the progress bar and W&B."""

    def __init__(self, cfg: Config, output_dir: Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 console: Console | None = None):
        self.cfg, self.enabled = cfg, enabled
        self.console = console or Console(stderr=True)
        self.path = output_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        self._wandb = None
        self._progress: Progress | None = None
        if not enabled:
            return
        # a resumed run continues the file: drop records past the checkpoint (they will be redone)
        self.history = read_history(self.path, up_to_step=start_step)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        if cfg.wandb.enabled:
            self._wandb = _init_wandb(cfg, output_dir)
        self._interactive = self.console.is_terminal
        if self._interactive:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (must hold ``step``) to metrics.jsonl, W&B and the progress display."""
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        self.history.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
        info = _short(record)
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], info=info)
        else:  # logs and CI: a plain line per logged step instead of a redrawn bar
            self.console.print(f"step {record['step']}: {info}", highlight=False)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def log_model(self, directory: Path, kind: str) -> None:
        """Log a saved model/adapter directory as a W&B artifact (offline runs keep it for `wandb sync`)."""
        if self._wandb is None:
            return
        import wandb

        artifact = wandb.Artifact(f"{self._wandb.name or 'run'}-{kind}".replace("/", "-"), type=kind,
                                  metadata={"git_sha": git_sha(), "config": to_dict(self.cfg)})
        artifact.add_dir(str(directory))
        self._wandb.log_artifact(artifact)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _init_wandb(cfg: Config, output_dir: Path):
    """One W&B run per output_dir: its id is kept in ``wandb_run_id`` so ``resume=auto`` continues the
    same run instead of opening a new one (``wandb.id`` — set by sweep agents — takes precedence)."""
    import wandb

    w = cfg.wandb
    mode = wandb_mode(w.mode)
    id_file = output_dir / "wandb_run_id"
    run_id = w.id or (id_file.read_text().strip() if id_file.is_file() else None) or uuid.uuid4().hex[:8]
    run = wandb.init(project=w.project, name=w.name or output_dir.name, group=w.group, tags=list(w.tags) or None,
                     config=to_dict(cfg), dir=str(output_dir), mode=mode, id=run_id, resume="allow")
    id_file.write_text(run.id + "\n")
    run.config.update({"git_sha": git_sha(), "command": " ".join(sys.argv)}, allow_val_change=True)
    return run


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the record readable by every parser
    return v


def _short(r: dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("lr", "lr {:.2e}"), ("tokens_per_sec", "{:,.0f} tok/s"),
                     ("mfu", "mfu {:.1%}")):
        if isinstance(r.get(key), (int, float)):
            parts.append(fmt.format(r[key]))
    return "  ".join(parts)


# --------------------------------------------------------------------------------------------
# End of run: summary table and loss curve
# --------------------------------------------------------------------------------------------
def summary_table(history: list[dict[str, Any]], *, wall_time: float, output_dir: Path, saved: dict[str, str],
                  title: str = "training summary") -> Table:
    train = [r for r in history if isinstance(r.get("loss"), (int, float))]
    vals = [r for r in history if isinstance(r.get("val_loss"), (int, float))]
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows: list[tuple[str, str]] = []
    if train:
        losses = [r["loss"] for r in train]
        rows += [("steps", str(train[-1]["step"])), ("loss first → final", f"{losses[0]:.4f} → {losses[-1]:.4f}"),
                 ("min loss", f"{min(losses):.4f}")]
    if vals:
        rows.append(("val loss / ppl", f"{vals[-1]['val_loss']:.4f} / {vals[-1].get('val_ppl', math.exp(vals[-1]['val_loss'])):.2f}"))
    speeds = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
    if speeds:
        rows.append(("tokens/s (mean)", f"{sum(speeds) / len(speeds):,.0f}"))
    mfus = [r["mfu"] for r in train if isinstance(r.get("mfu"), float)]
    if mfus:
        rows.append(("MFU (mean)", f"{sum(mfus) / len(mfus):.1%}"))
    mems = [r["peak_mem_gb"] for r in train if r.get("peak_mem_gb")]
    if mems:
        rows.append(("peak memory", f"{max(mems):.2f} GiB ({train[-1].get('mem_kind', '')})"))
    rows.append(("wall time", _duration(wall_time)))
    rows.append(("output", str(output_dir)))
    rows += [(k, v) for k, v in saved.items()]
    for k, v in rows:
        table.add_row(k, v)
    return table


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def plot_losses(history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Training loss per step (and validation loss where measured) as a PNG."""
    train = [(r["step"], r["loss"]) for r in history if isinstance(r.get("loss"), (int, float))]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), label="train loss", lw=1.2)
    val = [(r["step"], r["val_loss"]) for r in history if isinstance(r.get("val_loss"), (int, float))]
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class Throughput:
    """Tokens/s and MFU over the last logging window."""

    def __init__(self, flops_per_token: float, peak: float | None, world_size: int):
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak, world_size
        self.reset()

    def reset(self) -> None:
        self._t0, self._tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def measure(self) -> dict[str, float]:
        """``tokens`` are this rank's; tokens/s is per device, as MFU is."""
        dt = max(time.perf_counter() - self._t0, 1e-9)
        tps = self._tokens / dt
        out = {"tokens_per_sec": tps}
        if self.peak:
            out["mfu"] = tps * self.flops_per_token / self.peak
        self.reset()
        return out
