"""Hyperparameter sweeps over our dotted config keys, in the W&B sweep file format.

Two controllers share one trial runner:
- online (a W&B API key is present): ``wandb.sweep`` + ``wandb.agent``; the agent callback reads the
  suggested parameters, hands the run id to the trial, and only the trial's rank 0 writes to that run.
- offline (no server): a local controller for grid / random (bayes through optuna when installed),
  trials run one after another or several at once on disjoint devices, hyperband early termination,
  a local trial table (``trials.jsonl`` + ``trials.csv``) and W&B offline runs grouped by sweep id.

Every trial is ``torchrun ... launch/train.py config=<base> key=value ...`` — exactly what a user
would type — so a sweep never exercises a code path that a single run does not.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainer.config import REPO_ROOT, ConfigError, find_config_file, load_config, read_yaml_with_extends

DISTRIBUTIONS = {
    "uniform", "log_uniform_values", "int_uniform", "q_uniform", "q_log_uniform_values",
    "normal", "categorical", "constant",
}
METHODS = ("grid", "random", "bayes")


# --------------------------------------------------------------------------------------------
# Sweep specification
# --------------------------------------------------------------------------------------------
@dataclass
class Param:
    key: str  # dotted config key, e.g. train.lr
    values: list[Any] | None = None  # grid / categorical
    distribution: str | None = None
    min: float | None = None
    max: float | None = None
    q: float | None = None
    mu: float = 0.0
    sigma: float = 1.0

    def sample(self, rng: random.Random) -> Any:
        d = self.distribution
        if self.values is not None:
            return rng.choice(self.values)
        if d == "uniform":
            return rng.uniform(self.min, self.max)
        if d == "int_uniform":
            return rng.randint(int(self.min), int(self.max))
        if d == "log_uniform_values":
            return math.exp(rng.uniform(math.log(self.min), math.log(self.max)))
        if d == "q_uniform":
            return round(rng.uniform(self.min, self.max) / self.q) * self.q
        if d == "q_log_uniform_values":
            return round(math.exp(rng.uniform(math.log(self.min), math.log(self.max))) / self.q) * self.q
        if d == "normal":
            return rng.gauss(self.mu, self.sigma)
        raise AssertionError(d)


@dataclass
class EarlyTerminate:
    min_iter: int
    eta: float = 3.0

    def brackets(self, max_step: int) -> list[int]:
        out, b = [], self.min_iter
        while b < max_step:
            out.append(b)
            b = int(math.ceil(b * self.eta))
        return out


@dataclass
class SweepSpec:
    path: Path
    method: str
    metric: str
    goal: str  # minimize | maximize
    params: list[Param]
    base_config: str
    program: str = "launch/train.py"
    count: int | None = None
    nproc_per_node: int = 1
    parallel_trials: int = 1
    devices: list[str] = field(default_factory=list)  # e.g. ["0", "1"] -> one trial per device group
    project: str = "crucible"
    early_terminate: EarlyTerminate | None = None
    seed: int = 0
    raw: dict[str, Any] = field(default_factory=dict)

    def better(self, a: float, b: float) -> bool:
        return a < b if self.goal == "minimize" else a > b

    def wandb_sweep_config(self) -> dict[str, Any]:
        """The spec in W&B's own sweep format (what ``wandb.sweep`` receives)."""
        params = {}
        for p in self.params:
            if p.values is not None:
                params[p.key] = {"values": p.values}
            else:
                params[p.key] = {k: v for k, v in (("distribution", p.distribution), ("min", p.min), ("max", p.max), ("q", p.q)) if v is not None}
        cfg = {"method": self.method, "metric": {"name": self.metric, "goal": self.goal}, "parameters": params, "program": self.program}
        if self.early_terminate:
            cfg["early_terminate"] = {"type": "hyperband", "min_iter": self.early_terminate.min_iter, "eta": self.early_terminate.eta}
        return cfg


def load_sweep(name: str) -> SweepSpec:
    """Read and validate a sweep file; every problem is reported before any trial starts."""
    path = find_config_file(name, kind="sweep")
    raw = read_yaml_with_extends(path)
    where = f"sweep {path.name}"
    method = raw.get("method", "grid")
    if method not in METHODS:
        raise ConfigError(f"{where}: method={method!r} is not one of {', '.join(METHODS)}")
    metric = raw.get("metric") or {}
    if not isinstance(metric, dict) or "name" not in metric:
        raise ConfigError(f"{where}: metric must be a mapping with a name, e.g. metric: {{name: val_loss, goal: minimize}}")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise ConfigError(f"{where}: metric.goal={goal!r} must be minimize or maximize")
    base = raw.get("config") or raw.get("base_config")
    if not base:
        raise ConfigError(f"{where}: set config: <base config file> (e.g. config: qlora.yaml)")
    params = [_parse_param(where, k, v) for k, v in _flatten_params(raw.get("parameters") or {}).items()]
    if not params:
        raise ConfigError(f"{where}: parameters is empty; give at least one config key to sweep")
    et = raw.get("early_terminate")
    early = None
    if et:
        if et.get("type", "hyperband") != "hyperband":
            raise ConfigError(f"{where}: early_terminate.type={et.get('type')!r}; only hyperband is supported")
        if "min_iter" not in et:
            raise ConfigError(f"{where}: early_terminate needs min_iter (the first bracket, in training steps)")
        early = EarlyTerminate(int(et["min_iter"]), float(et.get("eta", 3)))
        if early.eta <= 1 or early.min_iter <= 0:
            raise ConfigError(f"{where}: early_terminate needs eta > 1 and min_iter > 0")
    spec = SweepSpec(
        path=path, method=method, metric=metric["name"], goal=goal, params=params, base_config=str(base),
        program=raw.get("program", "launch/train.py"), count=raw.get("count"),
        nproc_per_node=int(raw.get("nproc_per_node", 1)), parallel_trials=int(raw.get("parallel_trials", 1)),
        devices=[str(d) for d in raw.get("devices", [])], project=raw.get("project", "crucible"),
        early_terminate=early, seed=int(raw.get("seed", 0)), raw=raw,
    )
    if method != "grid" and not spec.count:
        raise ConfigError(f"{where}: method={method} needs count: <number of trials>")
    if method == "grid" and any(p.values is None for p in params):
        bad = [p.key for p in params if p.values is None]
        raise ConfigError(f"{where}: method=grid needs values lists; {', '.join(bad)} use distributions (use method: random)")
    _check_keys_against_schema(spec)
    return spec


def _flatten_params(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Accept dotted keys (``train.lr``) and W&B-style nesting (``train: {parameters: {lr: ...}}``)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "parameters" in v:
            out.update(_flatten_params(v["parameters"], key + "."))
        else:
            out[key] = v
    return out


def _parse_param(where: str, key: str, spec: Any) -> Param:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: parameter {key} must be a mapping like {{values: [...]}} or {{distribution: ..., min: .., max: ..}}")
    if "value" in spec:
        return Param(key, values=[spec["value"]])
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: parameter {key} has an empty values list")
        return Param(key, values=list(values))
    dist = spec.get("distribution")
    if dist is None:
        if "min" in spec and "max" in spec:
            dist = "int_uniform" if all(isinstance(spec[x], int) for x in ("min", "max")) else "uniform"
        else:
            raise ConfigError(f"{where}: parameter {key} needs values, value, or distribution with min/max")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: parameter {key} has unknown distribution {dist!r}; choose one of {', '.join(sorted(DISTRIBUTIONS))}")
    if dist in ("categorical", "constant"):
        raise ConfigError(f"{where}: parameter {key}: distribution {dist} needs values/value")
    if dist == "normal":
        return Param(key, distribution=dist, mu=float(spec.get("mu", 0)), sigma=float(spec.get("sigma", 1)))
    try:
        lo, hi = float(spec["min"]), float(spec["max"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: parameter {key}: distribution {dist} needs numeric min and max") from None
    if lo >= hi:
        raise ConfigError(f"{where}: parameter {key}: min ({lo}) must be below max ({hi})")
    if "log" in dist and lo <= 0:
        raise ConfigError(f"{where}: parameter {key}: {dist} needs min > 0 (got {lo})")
    q = spec.get("q")
    if dist.startswith("q_") and not q:
        raise ConfigError(f"{where}: parameter {key}: {dist} needs q")
    if dist == "int_uniform":
        return Param(key, distribution=dist, min=int(lo), max=int(hi))
    return Param(key, distribution=dist, min=lo, max=hi, q=float(q) if q else None)


def _check_keys_against_schema(spec: SweepSpec) -> None:
    """Build the base config with a representative value of every parameter: unknown keys and bad types fail now."""
    probe = random.Random(0)
    values = [f"{p.key}={_cli(p.values[0] if p.values is not None else p.sample(probe))}" for p in spec.params]
    try:
        load_config([f"config={spec.base_config}", *values])
    except ConfigError as e:
        raise ConfigError(f"sweep {spec.path.name}: {e}") from None


def _cli(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


# --------------------------------------------------------------------------------------------
# Suggesting parameters
# --------------------------------------------------------------------------------------------
def suggestions(spec: SweepSpec) -> Callable[[list["Trial"]], dict[str, Any] | None]:
    """A function (finished trials) -> next parameter set, or None when the sweep is exhausted."""
    if spec.method == "grid":
        grid = [dict(zip([p.key for p in spec.params], combo)) for combo in itertools.product(*[p.values for p in spec.params])]
        limit = min(len(grid), spec.count or len(grid))
        return lambda trials: grid[len(trials)] if len(trials) < limit else None
    if spec.method == "random":
        rng = random.Random(spec.seed)
        return lambda trials: {p.key: p.sample(rng) for p in spec.params} if len(trials) < spec.count else None
    return _bayes(spec)


def _bayes(spec: SweepSpec) -> Callable[[list["Trial"]], dict[str, Any] | None]:
    try:
        import optuna
    except ImportError:
        raise ConfigError("method=bayes needs optuna (pip install optuna) when no W&B server is available; use grid or random") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=spec.goal, sampler=optuna.samplers.TPESampler(seed=spec.seed))
    pending: dict[int, Any] = {}

    def suggest(trials: list[Trial]) -> dict[str, Any] | None:
        for t in trials:
            if t.index in pending and t.metric is not None:
                study.tell(pending.pop(t.index), t.metric)
        if len(trials) >= spec.count:
            return None
        ot = study.ask()
        pending[len(trials)] = ot
        out = {}
        for p in spec.params:
            if p.values is not None:
                out[p.key] = ot.suggest_categorical(p.key, p.values)
            elif p.distribution == "int_uniform":
                out[p.key] = ot.suggest_int(p.key, int(p.min), int(p.max))
            else:
                out[p.key] = ot.suggest_float(p.key, p.min, p.max, log="log" in p.distribution)
        return out

    return suggest


# --------------------------------------------------------------------------------------------
# Running trials
# --------------------------------------------------------------------------------------------
@dataclass
class Trial:
    index: int
    params: dict[str, Any]
    output_dir: Path
    status: str = "pending"  # running | completed | failed | early_stopped
    metric: float | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    returncode: int | None = None

    @property
    def name(self) -> str:
        return f"trial-{self.index:03d}"

    def row(self) -> dict[str, Any]:
        return {"trial": self.name, "status": self.status, "metric": self.metric, "seconds": round(self.seconds, 1),
                "returncode": self.returncode, "output_dir": str(self.output_dir), **{f"param.{k}": v for k, v in self.params.items()}}


def trial_command(spec: SweepSpec, params: dict[str, Any], output_dir: Path, group: str, run_name: str,
                  run_id: str | None = None, wandb_enabled: bool = True) -> list[str]:
    """The exact ``torchrun ... launch/train.py`` command of one trial (also used by the online agent)."""
    program = str((REPO_ROOT / spec.program) if not Path(spec.program).is_absolute() else spec.program)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.nproc_per_node}", program,
           f"config={spec.base_config}"]
    cmd += [f"{k}={_cli(v)}" for k, v in params.items()]
    cmd += [f"output_dir={output_dir}", f"wandb.enabled={'true' if wandb_enabled else 'false'}", f"wandb.group={group}",
            f"wandb.name={run_name}", f"wandb.project={spec.project}", "wandb.log_model=true", "resume=auto"]
    if run_id:
        cmd.append(f"wandb.id={run_id}")
    return cmd


def read_metric_history(output_dir: Path, metric: str) -> list[tuple[int, float]]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if metric in row and row[metric] is not None and "step" in row:
            out.append((int(row["step"]), float(row[metric])))
    return out


class LocalController:
    """Grid / random / bayes without a server; hyperband early termination against earlier trials."""

    def __init__(self, spec: SweepSpec, sweep_dir: Path, poll_s: float = 1.0):
        self.spec, self.dir, self.poll_s = spec, sweep_dir, poll_s
        self.sweep_id = f"{spec.path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.trials: list[Trial] = []

    def run(self, progress: Callable[[Trial], None] = lambda t: None) -> list[Trial]:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "sweep.json").write_text(json.dumps({"id": self.sweep_id, "spec": self.spec.wandb_sweep_config(),
                                                          "base_config": self.spec.base_config}, indent=2, default=str))
        suggest = suggestions(self.spec)
        slots = self._device_slots()
        running: list[tuple[Trial, subprocess.Popen, float, int]] = []  # (trial, process, start, slot index)
        exhausted = False
        while running or not exhausted:
            while not exhausted and len(running) < len(slots):
                params = suggest([t for t in self.trials if t.status not in ("pending",)])
                if params is None:
                    exhausted = True
                    break
                trial = Trial(len(self.trials), params, self.dir / f"trial-{len(self.trials):03d}")
                self.trials.append(trial)
                slot = next(i for i in range(len(slots)) if i not in {r[3] for r in running})
                running.append((trial, self._launch(trial, slots[slot]), time.time(), slot))
            time.sleep(self.poll_s)
            for item in list(running):
                trial, proc, start, _ = item
                trial.history = read_metric_history(trial.output_dir, self.spec.metric)
                if proc.poll() is None and self._should_stop(trial):
                    proc.terminate()
                    proc.wait(timeout=60)
                    trial.status = "early_stopped"
                if proc.poll() is not None:
                    running.remove(item)
                    trial.seconds = time.time() - start
                    trial.returncode = proc.returncode
                    trial.history = read_metric_history(trial.output_dir, self.spec.metric)
                    trial.metric = trial.history[-1][1] if trial.history else None
                    if trial.status != "early_stopped":
                        trial.status = "completed" if proc.returncode == 0 and trial.metric is not None else "failed"
                    self._record(trial)
                    progress(trial)
        return self.trials

    def _device_slots(self) -> list[str | None]:
        if self.spec.devices:
            per = self.spec.nproc_per_node
            groups = [self.spec.devices[i:i + per] for i in range(0, len(self.spec.devices), per)]
            return [",".join(g) for g in groups if len(g) == per][: max(1, self.spec.parallel_trials)]
        return [None] * max(1, self.spec.parallel_trials)

    def _launch(self, trial: Trial, devices: str | None) -> subprocess.Popen:
        trial.output_dir.mkdir(parents=True, exist_ok=True)
        trial.status = "running"
        cmd = trial_command(self.spec, trial.params, trial.output_dir, self.sweep_id, trial.name)
        env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), PYTHONUNBUFFERED="1")
        env["WANDB_DIR"] = str(trial.output_dir)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        (trial.output_dir / "command.txt").write_text(" ".join(cmd) + "\n")
        log = open(trial.output_dir / "trial.log", "w")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path.cwd())

    def _should_stop(self, trial: Trial) -> bool:
        """Hyperband: at each bracket, stop a trial outside the best 1/eta of the trials that reached it."""
        et = self.spec.early_terminate
        if et is None or not trial.history:
            return False
        step = trial.history[-1][0]
        for bracket in reversed(et.brackets(10**9)):
            if step >= bracket:
                break
        else:
            return False
        mine = _value_at(trial.history, bracket)
        others = [_value_at(t.history, bracket) for t in self.trials if t is not trial and t.history]
        others = [v for v in others if v is not None]
        if mine is None or len(others) < 1:
            return False
        values = sorted(others + [mine], reverse=self.spec.goal == "maximize")
        keep = max(1, int(math.ceil(len(values) / et.eta)))
        return not values.index(mine) < keep

    def _record(self, trial: Trial) -> None:
        with open(self.dir / "trials.jsonl", "a") as f:
            f.write(json.dumps(trial.row(), default=str) + "\n")
        rows = [t.row() for t in self.trials if t.status not in ("pending", "running")]
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("param."), k))
        tmp = self.dir / "trials.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.dir / "trials.csv")


def _value_at(history: list[tuple[int, float]], step: int) -> float | None:
    """The metric at the first logged step >= ``step`` (so trials logging at different cadences compare)."""
    for s, v in history:
        if s >= step:
            return v
    return None


# --------------------------------------------------------------------------------------------
# Online (W&B server) path
# --------------------------------------------------------------------------------------------
def has_wandb_server() -> bool:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.path.expanduser("~/.netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text()


def make_agent_callback(spec: SweepSpec, sweep_dir: Path, sweep_id: str, wandb_module: Any,
                        runner: Callable[[list[str]], int] = lambda cmd: subprocess.call(cmd)) -> Callable[[], None]:
    """The function ``wandb.agent`` calls per trial.

    The agent process only *reads* the suggested parameters and the run id, then closes its handle;
    the trial's rank 0 re-opens that same run (``wandb.id``) and is the only process that logs to it,
    so a multi-process trial never creates one run per GPU.
    """
    counter = itertools.count()

    def callback() -> None:
        run = wandb_module.init()
        params, run_id = dict(run.config), run.id
        wandb_module.finish()
        index = next(counter)
        out = sweep_dir / f"trial-{index:03d}-{run_id}"
        cmd = trial_command(spec, params, out, sweep_id, f"trial-{index:03d}", run_id=run_id)
        code = runner(cmd)
        if code != 0:
            print(f"[sweep] trial {index} ({run_id}) exited with code {code}; see {out}/trial.log", file=sys.stderr)

    return callback


def run_online(spec: SweepSpec, sweep_dir: Path) -> str:
    import wandb

    sweep_id = wandb.sweep(sweep=spec.wandb_sweep_config(), project=spec.project)
    wandb.agent(sweep_id, function=make_agent_callback(spec, sweep_dir, sweep_id, wandb), count=spec.count, project=spec.project)
    return sweep_id


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def load_trials(sweep_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    path = Path(sweep_dir) / "trials.jsonl"
    if not path.is_file():
        raise ConfigError(f"sweep_dir={sweep_dir} has no trials.jsonl (not a sweep directory, or no trial finished yet)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    meta_path = Path(sweep_dir) / "sweep.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return rows, meta


def leaderboard(rows: list[dict[str, Any]], goal: str) -> list[dict[str, Any]]:
    """Finished trials with a metric, best first (early-stopped ones after completed ones)."""
    scored = [r for r in rows if r.get("metric") is not None and r.get("status") in ("completed", "early_stopped")]
    sign = 1 if goal == "minimize" else -1
    return sorted(scored, key=lambda r: (r["status"] != "completed", sign * r["metric"]))


def report(sweep_dir: Path, console=None) -> list[dict[str, Any]]:
    """Print the leaderboard and write ``<sweep_dir>/sweep.png`` (metric against each parameter)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rows, meta = load_trials(sweep_dir)
    spec = meta.get("spec", {})
    metric, goal = spec.get("metric", {}).get("name", "metric"), spec.get("metric", {}).get("goal", "minimize")
    board = leaderboard(rows, goal)
    # parameters held at one value (``value:``) are the same for every trial: not a leaderboard column
    params = sorted(k for k in {k for r in rows for k in r if k.startswith("param.")} if len({str(r.get(k)) for r in rows}) > 1)
    table = Table(title=f"sweep {meta.get('id', sweep_dir)} — {metric} ({goal}), best first")
    for col in ["#", "trial", metric, "status", *[p[6:] for p in params], "seconds"]:
        table.add_column(col, justify="right" if col not in ("trial", "status") else "left")
    for i, r in enumerate(board, 1):
        table.add_row(str(i), r["trial"], f"{r['metric']:.4f}", r["status"], *[_fmt(r.get(p)) for p in params], str(r.get("seconds")))
    for r in rows:
        if r not in board:
            table.add_row("-", r["trial"], "-", r["status"], *[_fmt(r.get(p)) for p in params], str(r.get("seconds")))
    console.print(table)
    _plot(sweep_dir, rows, params, metric)
    return board


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _log_axis(key: str, values: list[float]) -> bool:
    """Learning rates (``lr`` / ``*_lr``) always get a log axis: they are swept multiplicatively, and a
    linear axis over a narrow range crowds its labels; other positive parameters when they span >= 20x."""
    if min(values) <= 0:
        return False
    name = key.rsplit(".", 1)[-1]
    return name == "lr" or name.endswith("_lr") or max(values) / min(values) >= 20


def _plot(sweep_dir: Path, rows: list[dict[str, Any]], params: list[str], metric: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    done = [r for r in rows if r.get("metric") is not None]
    if not done or not params:
        return None
    fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 3.6), squeeze=False)
    for ax, p in zip(axes[0], params):
        xs = [r[p] for r in done]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        x_plot = xs if numeric else [str(x) for x in xs]
        colors = ["tab:blue" if r["status"] == "completed" else "tab:orange" for r in done]
        ax.scatter(x_plot, [r["metric"] for r in done], c=colors)
        if numeric and _log_axis(p[6:], xs):
            ax.set_xscale("log")
            # over less than a decade a log axis labels its minor ticks, which crowd: label the
            # decades and a few values between them in plain notation instead
            ax.xaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
            ax.tick_params(axis="x", which="both", labelrotation=30)
        ax.set_xlabel(p[6:])
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} per parameter (orange: early-stopped)")
    fig.tight_layout()
    out = Path(sweep_dir) / "sweep.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
