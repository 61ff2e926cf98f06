"""Hyperparameter sweeps: ``python launch/sweep.py sweep=sweep.yaml output_dir=runs/sweep``.

With a W&B API key the sweep runs on the W&B server (``wandb.sweep`` + agent); without one, a local
controller runs the same sweep file (grid/random/bayes, hyperband) and logs each trial offline.
``python launch/sweep.py report sweep_dir=runs/sweep`` prints the leaderboard and writes sweep.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

from trainer.config import ConfigError, parse_overrides  # noqa: E402
from trainer import sweep as sweeps  # noqa: E402

USAGE = "usage: python launch/sweep.py sweep=<file.yaml> [output_dir=DIR] [mode=auto|online|offline]\n       python launch/sweep.py report sweep_dir=DIR"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console()
    try:
        if argv and argv[0] == "report":
            _, opts = parse_overrides(argv[1:])
            if "sweep_dir" not in opts:
                raise ConfigError("report needs sweep_dir=<directory of a sweep>")
            board = sweeps.report(Path(str(opts["sweep_dir"])), console)
            return 0 if board else 1
        _, opts = parse_overrides(argv)
        unknown = set(opts) - {"sweep", "output_dir", "mode"}
        if unknown or "sweep" not in opts:
            raise ConfigError(f"unknown option(s) {sorted(unknown)}; {USAGE}" if unknown else f"missing sweep=<file>; {USAGE}")
        spec = sweeps.load_sweep(str(opts["sweep"]))
        sweep_dir = Path(str(opts.get("output_dir", f"runs/sweep-{spec.path.stem}")))
        mode = str(opts.get("mode", "auto"))
        if mode == "online" or (mode == "auto" and sweeps.has_wandb_server()):
            console.print(f"[bold]online sweep[/] on the W&B server, project {spec.project}")
            sweeps.run_online(spec, sweep_dir)
            return 0
        console.print(f"[bold]offline sweep[/] {spec.path.name}: method={spec.method}, metric={spec.metric} ({spec.goal}), "
                      f"trials run {spec.parallel_trials} at a time x {spec.nproc_per_node} process(es); logs in {sweep_dir}")
        controller = sweeps.LocalController(spec, sweep_dir)

        def progress(trial: sweeps.Trial) -> None:
            metric = "-" if trial.metric is None else f"{trial.metric:.4f}"
            swept = {p.key for p in spec.params if p.values is None or len(p.values) > 1}
            params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items() if k in swept)
            console.print(f"  {trial.name} {trial.status:<13} {spec.metric}={metric}  {params}  ({trial.seconds:.0f}s)")

        trials = controller.run(progress)
        board = sweeps.report(sweep_dir, console)
        failed = [t for t in trials if t.status == "failed"]
        if failed:
            console.print(f"[red]{len(failed)} trial(s) failed[/]: see " + ", ".join(str(t.output_dir / 'trial.log') for t in failed))
        return 0 if board else 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
