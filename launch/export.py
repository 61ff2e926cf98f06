"""Export a trained model: merged safetensors, AWQ int4, or GGUF (F32 ... Q4_K_M), then verify it.

    python launch/export.py run=runs/sft format=gguf gguf.type=q4_k_m output_dir=exports/
    python launch/export.py run=smollm2-135m-instruct format=awq awq.calib_samples=64
    python launch/export.py run=runs/qlora/final format=merged verify.strict=false

Exit status: 0 on success, 1 when a verification check fails (unless verify.strict=false),
2 on a configuration error.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from trainer.config import ConfigError, load_config  # noqa: E402


def summary(artifacts) -> list[Table]:
    table = Table(title="export summary")
    for col in ("artifact", "weights", "bits/weight", "time", "notes", "verified"):
        table.add_column(col, overflow="fold")
    for a in artifacts:
        verdict = ("[green]pass[/]" if a.passed else "[red]FAIL[/]") if a.checks else "[dim]-[/]"
        table.add_row(a.path, f"{a.n_bytes / 2**20:.1f} MiB", f"{a.bits_per_weight:.2f}", f"{a.seconds:.1f}s", a.note, verdict)
    checks = Table(title="verification (artifact reloaded vs source)")
    for col in ("artifact", "metric", "value", "threshold", "result"):
        checks.add_column(col, overflow="fold")
    for a in artifacts:
        for c in a.checks:
            checks.add_row(Path(a.path).name, c.metric, f"{c.value:.4g}", c.limit, "[green]ok[/]" if c.passed else "[red]FAIL[/]")
    return [table, checks] if checks.row_count else [table]


def how_to_run(artifact) -> str:
    """The next command for an artifact: where its consumers load it from."""
    path = artifact.path
    if artifact.kind == "gguf":
        return f"llama.cpp: llama-cli -m {path}  |  python: llama_cpp.Llama(model_path={path!r})  |  ours: engine.LLM({path!r})"
    if artifact.kind == "gguf-adapter":
        return f"llama.cpp: llama-cli -m <base gguf> --lora {path}"
    int4 = " (int4 weights stay packed: Triton kernel on GPU)" if artifact.kind == "awq" else ""
    return f"engine.LLM({path!r}){int4}  |  python launch/eval.py model.path={path}  |  python launch/serve.py model.path={path}"


def main(argv: list[str]) -> int:
    console = Console()
    try:
        cfg = load_config(argv)
        from export.pipeline import run_export

        artifacts = run_export(cfg, console)
    except ConfigError as e:
        console.print(f"[red]error:[/] {e}", markup=True, highlight=False)
        return 2
    for table in summary(artifacts):
        console.print(table)
    for a in artifacts:
        console.print(f"[bold]run it:[/] {how_to_run(a)}", highlight=False, soft_wrap=True)
    failed = [c.metric for a in artifacts for c in a.checks if not c.passed]
    if failed:
        verdict = "exiting 1" if cfg.verify.strict else "continuing: verify.strict=false"
        console.print(f"[red]verification failed[/] ({', '.join(failed)}); {verdict}")
        return 1 if cfg.verify.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
