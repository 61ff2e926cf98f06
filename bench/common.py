"""Helpers every GPU benchmark shares: model shapes, the synthetic corpus, timing, memory, results.

A benchmark is one script that runs in a single call on the GPU machine, prints a rich table last
and writes one JSON file (``--out``). Nothing here downloads anything: model shapes are written from
the published configs and instantiated with random weights, the tokenizer is the SmolLM2 one
committed under ``bench/assets/``, and the corpus is generated from the built-in chat set.

    shape = SHAPES["llama-3.2-1b"]
    model_dir = build_model_dir("llama-3.2-1b", workdir / "model")   # random init + tokenizer
    corpus = write_corpus(workdir / "corpus", tokenizer, num_tokens=600_000, max_doc_tokens=2047)
    save_results(args.out, "sft_vs_trl", args, rows)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # scripts run as `python bench/x.py`; make `trainer`, `bench` importable
    sys.path.insert(0, str(REPO_ROOT))
TOKENIZER_DIR = REPO_ROOT / "bench" / "assets" / "smollm2-tokenizer"
GIB = 1024**3

# --------------------------------------------------------------------------------------------
# Model shapes, from each model's published config.json. Every shape uses the SmolLM2 tokenizer
# (vocab 49152) because it is the only tokenizer available offline; for the Qwen3 and Llama shapes
# that shrinks the embedding and LM head (reported in every result as `vocab_note`).
# --------------------------------------------------------------------------------------------
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(arch="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, intermediate_size=1536, rope_theta=100_000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True, published_vocab=49152),
    "qwen3-0.6b": dict(arch="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=40960, tie_word_embeddings=True, published_vocab=151936),
    "llama-3.2-1b": dict(arch="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, intermediate_size=8192, rope_theta=500_000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, tie_word_embeddings=True, published_vocab=128256,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-3-8b": dict(arch="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, intermediate_size=14336, rope_theta=500_000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, tie_word_embeddings=False, published_vocab=128256),
    # --smoke: the same code paths on CPU in seconds
    "tiny": dict(arch="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, rope_theta=10_000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=4096, tie_word_embeddings=True, published_vocab=49152),
}
_CONFIG_CLASSES = {"llama": "LlamaConfig", "qwen3": "Qwen3Config"}

# Dense BF16 tensor-core peak per GPU (datasheets, no sparsity), matched on the device name.
BF16_PEAK_FLOPS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12))


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def hf_config(shape: str, tokenizer=None):
    """The transformers config of a named shape with the bench tokenizer's vocabulary and special ids."""
    import transformers

    if shape not in SHAPES:
        raise SystemExit(f"error: unknown --shape {shape!r}; choose one of: {', '.join(SHAPES)}")
    spec = dict(SHAPES[shape])
    arch, rope_scaling = spec.pop("arch"), spec.pop("rope_scaling", None)
    spec.pop("published_vocab")
    tokenizer = tokenizer or load_tokenizer()
    rope = {"rope_type": "default", "rope_theta": spec.pop("rope_theta")}
    if rope_scaling:
        rope.update(rope_scaling)
    config = getattr(transformers, _CONFIG_CLASSES[arch])(
        **spec, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # transformers 5 reads RoPE from `rope_parameters`; set after construction so both the class
    # defaults and this shape's values agree whatever the minor version
    config.rope_parameters = rope
    return config


def vocab_note(shape: str) -> str:
    published = SHAPES[shape]["published_vocab"]
    return "" if published == 49152 else f"vocab 49152 (SmolLM2 tokenizer) instead of the published {published}"


def build_model_dir(shape: str, out: Path, seed: int = 0, dtype: str = "bfloat16") -> str:
    """Random-init ``shape`` with the bench tokenizer, saved as an HF directory (reused if present)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if (out / "config.json").is_file():
        return str(out)
    tokenizer = load_tokenizer()
    config = hf_config(shape, tokenizer)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def parameter_counts(config) -> dict[str, int]:
    """Total and non-embedding parameters of a llama/qwen3 config, computed from the shape (no model needed)."""
    h, l, v = config.hidden_size, config.num_hidden_layers, config.vocab_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    attn = h * q + 2 * h * kv + q * h + (2 * hd if config.model_type == "qwen3" else 0)  # qwen3: q/k norms
    mlp = 3 * h * config.intermediate_size
    layers = l * (attn + mlp + 2 * h)
    embeddings = v * h * (1 if config.tie_word_embeddings else 2)
    return {"total": layers + embeddings + h, "non_embedding": layers + h, "embedding": embeddings}


def train_flops_per_token(config, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 x dense params (incl. LM head) + attention, the PaLM / torchtitan count.

    The LM head matmul counts (it is real work); the embedding lookup does not. Attention is
    12 * layers * heads * head_dim * seq_len (QK^T and AV, forward + backward), without the causal
    halving, as torchtitan and Megatron report MFU, so numbers compare with theirs.
    """
    counts = parameter_counts(config)
    dense = counts["non_embedding"] + config.vocab_size * config.hidden_size  # + LM head
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 6 * dense + 12 * config.num_hidden_layers * config.num_attention_heads * hd * seq_len


# --------------------------------------------------------------------------------------------
# The corpus: the built-in chat set rendered as plain text, grouped into documents of varied length
# --------------------------------------------------------------------------------------------
def corpus_documents(tokenizer, num_tokens: int, max_doc_tokens: int, seed: int = 0) -> list[str]:
    """Deterministic documents totalling at least ``num_tokens`` tokens, each under ``max_doc_tokens``.

    Each document is a run of conversations ("User: ... / Assistant: ...") whose token budget is
    drawn uniformly from [max/8, max), so packing has realistic fill work to do. Keeping every
    document (plus its eos) within one sequence means both trainers see exactly the same token
    streams: no side cuts or truncates a document.
    """
    from trainer.data import synthetic_chat

    rng = random.Random(seed)
    docs: list[str] = []
    total = 0
    while total < num_tokens:
        # conversations average ~60 tokens; draw a pool and tokenize it in one batched call
        pool = synthetic_chat.generate(max(256, (num_tokens - total) // 40), seed=seed + len(docs))
        texts = ["\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in c["messages"]) + "\n\n" for c in pool]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        candidates, i = [], 0
        while i < len(texts) and total < num_tokens:
            budget, parts, used = rng.randint(max(8, max_doc_tokens // 8), max_doc_tokens - 1), [], 0
            while i < len(texts) and used + lengths[i] <= budget:
                parts.append(texts[i])
                used += lengths[i]
                i += 1
            if not parts:  # one conversation longer than the budget: drop it
                i += 1
                continue
            candidates.append("".join(parts).rstrip() + "\n")
            total += used
        # merges across conversation boundaries could change the count: check, the eos comes on top
        encoded = tokenizer(candidates, add_special_tokens=True)["input_ids"]
        docs += [d for d, ids in zip(candidates, encoded) if len(ids) < max_doc_tokens]
    return docs


def write_corpus(out: Path, docs: list[str]) -> Path:
    """One ``.txt`` per document: the layout ``data.source=text:<dir>`` reads as one document per file.

    Documents of an earlier run in the same ``--workdir`` are removed first: the corpus is exactly ``docs``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("doc*.txt"):
        stale.unlink()
    for i, doc in enumerate(docs):
        (out / f"doc{i:06d}.txt").write_text(doc, encoding="utf-8")
    return out


# --------------------------------------------------------------------------------------------
# Device, timing, memory, profiling
# --------------------------------------------------------------------------------------------
def gpu_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / GIB, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda, bf16_peak_tflops=bf16_peak_flops(props.name) / 1e12 if bf16_peak_flops(props.name) else None)
    else:
        info.update(gpu=None, device="cpu", cpu_count=os.cpu_count())
    return info


def bf16_peak_flops(device_name: str) -> float | None:
    for key, flops in BF16_PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_memory() -> None:
    """Return the memory of models/engines the caller has already ``del``-ed to the device (a helper
    taking the object as an argument cannot free it: the caller's name still holds it)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def now() -> float:
    """A timestamp after all queued GPU work has finished."""
    synchronize()
    return time.perf_counter()


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """Peak bytes held by tensors (``max_memory_allocated``) since the last reset; None on CPU."""
    import torch

    return round(torch.cuda.max_memory_allocated() / GIB, 3) if torch.cuda.is_available() else None


def peak_reserved_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_reserved() / GIB, 3) if torch.cuda.is_available() else None


def allocated_gib() -> float | None:
    """Memory held by live tensors now (weights, adapters, optimizer states before the first step)."""
    import torch

    return round(torch.cuda.memory_allocated() / GIB, 3) if torch.cuda.is_available() else None


# --------------------------------------------------------------------------------------------
# Our trainer, measured the way the TRL side is: wall time between optimizer steps
# --------------------------------------------------------------------------------------------
def real_tokens(batch: dict[str, Any]) -> int:
    """Tokens of real documents in a packed micro-batch (padding excluded).

    The loader pads a row at its end as one extra "document" (position ids restart there) whose
    labels are all ignored; a real document always has a trained label (it is at least 2 tokens).
    Preference/rollout batches (DPO, GRPO) carry no labels: their padding has ``doc_index < 0``.
    """
    trained = batch["labels"] != -100 if "labels" in batch else batch["doc_index"] >= 0
    n = 0
    for pos, keep in zip(batch["position_ids"], trained):
        starts = (pos == 0).nonzero().flatten()
        last = int(starts[-1]) if len(starts) else 0
        n += last if last > 0 and not bool(keep[last:].any()) else len(pos)
    return n


def run_crucible(overrides: list[str], warmup: int, steps: int, profile_steps: int = 0, memory_steps: int = 0) -> dict[str, Any]:
    """Train with crucible's ``Trainer`` in this process; per-step times, tokens, losses, top ops.

    ``profile_steps`` extra steps run under torch.profiler after the measured ones (so profiling
    never slows the timed steps), then ``memory_steps`` under a ``MemoryTrace`` (what is alive at
    the peak). Checkpoints are not written: saving is not what is measured.
    """
    from trainer.config import load_config
    from trainer.trainer import Trainer

    cfg = load_config(overrides + [f"train.max_steps={warmup + steps + profile_steps + memory_steps}"])
    clock: dict[str, Any] = {"times": [], "tokens": [], "top_ops": None}
    from bench.profiling import MemoryTrace, OpProfiler

    profiler, memory = OpProfiler(), MemoryTrace()
    traced_from, last = warmup + steps + profile_steps, warmup + steps + profile_steps + memory_steps

    class MeasuredTrainer(Trainer):
        def setup(self) -> None:
            super().setup()
            next_batch = self.method.next_batch

            def counted_next_batch():
                batch = next_batch()
                clock["pending_tokens"] = clock.get("pending_tokens", 0) + real_tokens(batch)
                return batch

            self.method.next_batch = counted_next_batch
            clock["static_gib"] = allocated_gib()
            clock["last"] = now()

        def train_step(self) -> dict[str, Any]:
            if profile_steps and self.step == warmup + steps:
                profiler.start()
            if memory_steps and self.step == traced_from:
                memory.start()
            record = super().train_step()
            if memory_steps and self.step == last:
                clock["memory_breakdown"] = memory.stop()
            t = now()
            clock["times"].append(t - clock["last"])
            clock["tokens"].append(clock.pop("pending_tokens", 0))
            clock["last"] = t
            if profile_steps and self.step == warmup + steps + profile_steps:
                clock["top_ops"] = profiler.stop()
                clock["profile_totals"] = profiler.totals
            return record

        def save(self):  # benchmark runs keep no checkpoints
            return None

    trainer = MeasuredTrainer(cfg)
    history = trainer.train()
    losses = [float(r["loss"]) for r in history if isinstance(r.get("loss"), (int, float))]
    n = warmup + steps
    return {"times": clock["times"][:n], "tokens": clock["tokens"][:n], "losses": losses[:n], "top_ops": clock["top_ops"],
            "profile_totals": clock.get("profile_totals"), "memory_breakdown": clock.get("memory_breakdown"), "static_gib": clock.get("static_gib"), "compile_stats": compile_stats() if cfg.train.compile else None,
            "trainable_params": trainer.trainable_params, "total_params": trainer.total_params, "history": history, "config": cfg}


def compile_stats() -> dict[str, Any]:
    """What torch.compile did in this process: graphs, graph breaks (with their reasons) and recompiles.
    A compiled run slower than eager usually shows up here first (recompiles or breaks inside a layer)."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "frames_compiled": int(counters["frames"].get("ok", 0)),
            "graph_breaks": int(sum(breaks.values())),
            "top_graph_breaks": [f"{n}x {reason[:160]}" for reason, n in breaks.most_common(3)],
            "recompiles": int(counters["recompiles"].get("total", 0)) if "recompiles" in counters else None}


# --------------------------------------------------------------------------------------------
# Arguments, results, tables
# --------------------------------------------------------------------------------------------
def bench_parser(description: str) -> argparse.ArgumentParser:
    """The flags every bench script takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps, CPU allowed: checks the code path, not speed")
    p.add_argument("--profile", action="store_true", help="print the top ops by CUDA time of our training steps")
    p.add_argument("--workdir", type=Path, default=None, help="scratch dir for models/corpora (default: a temp dir)")
    return p


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def git_commit() -> str:
    """The commit being measured: $CRUCIBLE_COMMIT (set it where the copy has no .git), else git, else 'unknown'."""
    if os.environ.get("CRUCIBLE_COMMIT"):
        return os.environ["CRUCIBLE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names: list[str]) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def save_results(path: Path | None, bench: str, args: argparse.Namespace, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Write ``{bench, date, commit, command, env, args, rows, ...}`` atomically (called after every case,
    so a run cut short by its timeout still leaves the cases it finished)."""
    payload = {
        "bench": bench,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
        "env": gpu_info(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        **extra,
    }
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, path)
    return payload


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


TEXT_COLUMNS = {"shape", "method", "side", "baseline", "op", "case"}


def print_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]], notes: list[str] = ()) -> None:
    """A rich table of ``rows`` with ``columns`` as (key, header); notes print under it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for key, header in columns:
        table.add_column(header, justify="left" if key in TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*(fmt(row.get(key)) for key, _ in columns))
    console = Console(width=max(120, Console().width))
    console.print(table)
    for note in notes:
        console.print(f"[dim]{note}[/dim]")


def worker_result_path(workdir: Path, name: str) -> Path:
    return Path(workdir) / "results" / f"{name}.json"


# A head-to-head bench runs each side (ours, trl, ...) as `script --worker SIDE --spec spec.json` in a
# fresh process; these three helpers are that protocol, shared by the scripts that use it.
def add_side_arguments(parser: argparse.ArgumentParser, sides: tuple[str, ...], default_timeout: int) -> None:
    parser.add_argument("--side-timeout", type=int, default=None,
                        help=f"seconds each side may take, model load included (default: {default_timeout}; 1200 with --smoke on a shared CPU)")
    parser.add_argument("--sides", type=csv_list, default=list(sides), help=f"which of {','.join(sides)} to run")
    parser.add_argument("--worker", choices=sides, help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.set_defaults(_sides=sides, _default_timeout=default_timeout)


def check_sides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if unknown := set(args.sides) - set(args._sides):
        parser.error(f"--sides: unknown side(s) {', '.join(sorted(unknown))}; choose from {', '.join(args._sides)}")


def run_as_worker(args: argparse.Namespace, workers: dict[str, Any]) -> bool:
    """In a side's own process: run it and write its result; False in the driver process."""
    if not args.worker:
        return False
    spec = json.loads(args.spec.read_text())
    result = workers[args.worker](spec)
    worker_result_path(Path(spec["workdir"]), args.worker).write_text(json.dumps(result))
    return True


def run_sides(script: str, args: argparse.Namespace, workdir: Path, spec: dict[str, Any]):
    """Driver: yield (side, result) for each of ``args.sides``, each run by ``script`` in its own process."""
    spec_path = Path(workdir) / "spec.json"
    spec_path.write_text(json.dumps(spec))
    timeout = args.side_timeout or (1200 if args.smoke else args._default_timeout)
    for side in args.sides:
        cmd = [sys.executable, script, "--worker", side, "--spec", str(spec_path)]
        yield side, run_worker(cmd, worker_result_path(workdir, side), timeout=timeout, label=side)


def run_worker(cmd: list[str], result_path: Path, timeout: float | None = None, label: str = "",
               env_overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measured side in a fresh process (clean CUDA context, clean peak-memory counter).

    Its output streams through (indented) so progress is visible; the worker writes its result to
    ``result_path``. Failures come back as ``{"error": ...}`` so one broken side never hides the others.
    ``env_overrides`` (e.g. ``CUDA_VISIBLE_DEVICES``) apply to this worker only.
    """
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
               **(env_overrides or {}))
    start = time.perf_counter()
    tail: list[str] = []
    try:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        return {"error": f"could not start: {e}"}
    # a watchdog, not a check per output line: a hung worker may print nothing at all
    watchdog = threading.Timer(timeout, proc.kill) if timeout else None
    if watchdog:
        watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"  [{label}] {line.rstrip()}", flush=True)
            tail = (tail + [line.rstrip()])[-15:]
        rc = proc.wait()
    finally:
        if watchdog:
            watchdog.cancel()
    if timeout and rc < 0 and time.perf_counter() - start >= timeout:
        tail.append(f"killed after the {timeout:.0f}s case timeout")
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        last = next((line for line in reversed(tail) if line.strip()), "")
        result = {"error": f"exit code {rc}: {last[:300]}"}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def trainer_step_clock(times: list[float]):
    """A transformers TrainerCallback that appends each optimizer step's device-synchronized seconds to ``times``."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            synchronize()
            self.t = now()

        def on_step_end(self, args, state, control, **kw):
            synchronize()
            times.append(now() - self.t)

    return StepClock()
