"""One export: resolve the source, build the merged model, write the artifact atomically, verify it.

    report = run_export(cfg)   # cfg from launch/export.py; raises ConfigError on bad input

Artifacts are written under a hidden temporary name beside the final path and renamed into place
only once complete, so a failed or interrupted export never leaves a half-written artifact under
the final name.
"""
from __future__ import annotations

import copy
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from export import awq as awq_lib
from export.gguf_export import write_gguf, write_gguf_adapter
from export.merge import Source, merged_model, reference_model, resolve_source, save_merged
from export.verify import Check, TransformersBackend, chat_prompts, engine_greedy_check, load_backend, text_ids, verify
from trainer.config import Config, ConfigError


@dataclass
class Artifact:
    path: str
    kind: str  # merged | awq | gguf | gguf-adapter
    n_bytes: int
    n_params: int
    seconds: float
    note: str = ""
    checks: list[Check] = field(default_factory=list)
    group_size: int | None = None  # awq

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / max(1, self.n_params)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def _size(path: Path) -> int:
    """Bytes of weights: the file, or a directory's safetensors (tokenizer and config files excluded)."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.glob("*.safetensors"))


@contextmanager
def atomic_output(final: Path, is_dir: bool, overwrite: bool):
    """Yield a temporary path beside ``final``; rename it to ``final`` only if the block succeeds."""
    if final.exists() and not overwrite:
        raise ConfigError(f"output {final} already exists; pass export.overwrite=true or another output_dir")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def _artifact_name(path: str) -> str:
    """The run's name for <run>/final or <run>/checkpoints/step-N/model, else the directory's own."""
    p = Path(path)
    while p.name in ("model", "final", "checkpoints") or p.name.startswith("step-"):
        p = p.parent
    return p.name or "model"


def output_path(cfg: Config, src: Source) -> Path:
    name = cfg.export.name or _artifact_name(src.path)
    root = Path(cfg.output_dir) if cfg.output_dir != "runs/default" else Path("exports")
    if cfg.format == "gguf":
        return root / f"{name}-{cfg.gguf.type}.gguf"
    return root if cfg.output_dir != "runs/default" else root / f"{name}-{cfg.format}"


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)


def _n_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------
def export_merged(cfg: Config, src: Source, model, final: Path, progress: Progress) -> Artifact:
    t0 = time.time()
    task = progress.add_task("writing merged safetensors", total=1)
    with atomic_output(final, True, cfg.export.overwrite) as tmp:
        save_merged(model, src, tmp, cfg.export.dtype)
    progress.advance(task)
    note = f"{src.method} folded into base" + (" (dequantized NF4, no re-rounding)" if src.qlora else "")
    return Artifact(str(final), "merged", _size(final), _n_params(model), time.time() - t0, note)


def export_awq(cfg: Config, src: Source, model, tokenizer, final: Path, progress: Progress) -> Artifact:
    """AWQ-quantize a copy of ``model`` (the original stays fp: it is the verification reference)."""
    from transformers import GenerationConfig

    a = cfg.awq
    in_features = [m.in_features for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    group = awq_lib.choose_group_size(in_features, a.group_size, a.group_fallback)
    note = f"w4 g{group} zero-point" + (f" (g{a.group_size} does not divide hidden {model.config.hidden_size})" if group != a.group_size else "")
    calib = text_ids(tokenizer, a.calib_data, a.calib_samples, a.calib_seq_len)
    t0 = time.time()
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
    quantized = copy.deepcopy(model).to(device)  # fp32 copy: the scale/clip searches are many small forwards
    task = progress.add_task(f"AWQ calibration ({a.calib_samples}x{a.calib_seq_len} tokens, {device.type})", total=len(model.model.layers))
    packed = awq_lib.quantize_model(quantized, calib.to(device), group, a.n_grid, a.clip, a.search_tokens,
                                    progress=lambda i: progress.advance(task))
    quantized, packed = quantized.cpu(), {name: {k: t.cpu() for k, t in p.items()} for name, p in packed.items()}
    with atomic_output(final, True, cfg.export.overwrite) as tmp:
        awq_lib.save_awq(quantized, packed, group, tmp)
        tokenizer.save_pretrained(tmp)
        if (Path(src.base_dir) / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(src.base_dir).save_pretrained(tmp)
    return Artifact(str(final), "awq", _size(final), _n_params(model), time.time() - t0, note, group_size=group)


def export_gguf(cfg: Config, src: Source, model, final: Path, progress: Progress) -> list[Artifact]:
    t0 = time.time()
    state = model.state_dict()
    task = progress.add_task(f"GGUF {cfg.gguf.type}", total=len(state))
    config = model.config.to_dict()
    with atomic_output(final, False, cfg.export.overwrite) as tmp:
        report = write_gguf(tmp, config, state, src.tokenizer_dir, cfg.gguf.type, name=final.stem,
                            tokenizer_pre_name=cfg.gguf.tokenizer_pre, progress=lambda _n: progress.advance(task))
    mix = ", ".join(f"{k} {v / report.n_params:.0%}" for k, v in sorted(report.types.items(), key=lambda kv: -kv[1]))
    # bits/weight counts tensor bytes: the vocabulary metadata would dominate on tiny models
    out = [Artifact(str(final), "gguf", report.n_bytes, report.n_params, time.time() - t0, mix)]
    if src.adapter_dir and cfg.gguf.adapter and src.method == "lora":
        t0 = time.time()
        adapter_final = final.with_name(final.stem.removesuffix(f"-{cfg.gguf.type}") + "-lora.gguf")
        adapter_type = cfg.gguf.type if cfg.gguf.type in ("f32", "f16", "bf16") else "f32"
        with atomic_output(adapter_final, False, cfg.export.overwrite) as tmp:
            rep = write_gguf_adapter(tmp, src.adapter_dir, src.config, adapter_type)
        out.append(Artifact(str(adapter_final), "gguf-adapter", rep.n_bytes, rep.n_params, time.time() - t0,
                            f"LoRA {adapter_type}, use with the base GGUF (llama-server --lora)"))
    return out


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------
def _verify_backend(cfg: Config) -> str:
    if cfg.verify.backend != "auto":
        return cfg.verify.backend
    if cfg.format == "gguf":
        try:
            import llama_cpp  # noqa: F401

            return "llama_cpp"
        except ImportError:
            pass
    return "transformers"


def run_export(cfg: Config, console: Console | None = None) -> list[Artifact]:
    from transformers import AutoTokenizer

    console = console or Console()
    if cfg.format is None:
        raise ConfigError("format= is required: merged | awq | gguf")
    src = resolve_source(cfg.run, cfg.export.qlora)
    final = output_path(cfg, src)
    if final.exists() and not cfg.export.overwrite:  # fail before the expensive part
        raise ConfigError(f"output {final} already exists; pass export.overwrite=true or another output_dir")
    console.print(f"[bold]export[/] {cfg.run} ({src.method}) -> {final} [dim]format={cfg.format}[/]")
    tokenizer = AutoTokenizer.from_pretrained(src.tokenizer_dir)
    torch.manual_seed(cfg.seed)
    with _progress(console) as progress:
        task = progress.add_task("loading source model", total=1)
        reference = reference_model(src) if src.adapter_dir else None
        model = merged_model(src, reference)
        progress.advance(task)
        baseline = None  # AWQ: round-to-nearest perplexity, which AWQ must not exceed
        if cfg.format == "merged":
            artifacts = [export_merged(cfg, src, model, final, progress)]
        elif cfg.format == "awq":
            artifacts = [export_awq(cfg, src, model, tokenizer, final, progress)]
        else:
            artifacts = export_gguf(cfg, src, model, final, progress)
        if cfg.verify.enabled:
            v = cfg.verify
            task = progress.add_task("verifying (reload + compare)", total=len(artifacts))
            ids = text_ids(tokenizer, v.data, v.num_seqs, v.seq_len, skip=-1)
            prompts = chat_prompts(tokenizer)
            if cfg.format == "awq":
                rtn = copy.deepcopy(model)
                awq_lib.rtn_quantize_(rtn, artifacts[0].group_size)
                baseline = _perplexity(rtn, ids)
                del rtn
            ref = TransformersBackend(reference if (cfg.format == "merged" and reference is not None) else model)
            for art in artifacts:
                if art.kind == "gguf-adapter":
                    progress.advance(task)
                    continue
                key = cfg.gguf.type if art.kind == "gguf" else art.kind
                cand = load_backend(_verify_backend(cfg), art.path, cfg.format)
                art.checks = verify(ref, cand, ids, prompts, key, v.greedy_tokens, baseline)
                if art.kind == "awq" and v.backend == "auto":  # also where it is served: the engine's int4 path
                    art.checks.append(engine_greedy_check(ref, art.path, prompts, key, v.greedy_tokens))
                progress.advance(task)
    return artifacts


def _perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.exp(model(input_ids=ids, labels=ids, use_cache=False).loss))
