"""The config language: typed sections, YAML files that extend each other, dotted overrides.

One schema serves every entry point (train, eval, serve, export, generate, sweep). Each package
owns the sections it needs (``alignment.config.GRPOConfig`` ...); they are listed in ``SECTIONS``
by import path so this module never imports them eagerly.

    cfg = load_config(["config=qlora.yaml", "lora.rank=8", "train.lr=1e-4"])

User mistakes raise ``ConfigError`` with one line naming the key; launchers print it and exit 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A user error in the config: printed as one line, no traceback."""


# --------------------------------------------------------------------------------------------
# Core sections (the trainer's own). Other packages declare theirs in SECTIONS below.
# --------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    path: str = "smollm2-135m-instruct"  # alias, local HF dir, or hub id
    init: Literal["pretrained", "random"] = "pretrained"  # random: fresh weights from path's config (or arch + sizes)
    arch: Literal["llama", "mistral", "qwen2", "qwen3"] = "llama"  # for init=random without a config to copy
    hidden_size: int | None = None  # size overrides for init=random
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool | None = None
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    trust_remote_code: bool = False


@dataclass
class TrainConfig:
    method: Literal["sft", "dpo", "grpo", "distill"] = "sft"
    max_steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    seq_len: int = 512
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"] = "adamw"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    activation_checkpointing: Literal["none", "full", "selective", "offload"] = "none"
    ac_every_k: int = 2  # selective: checkpoint every k-th decoder layer
    loss_chunk_size: int = 1024  # tokens per chunk of the chunked cross-entropy (0 = unchunked)
    # each decoder MLP runs over its tokens in this many slices: its [tokens, intermediate] buffers
    # (the largest of a layer's backward) shrink by this factor at the same FLOPs (ALST's TiledMLP idea)
    mlp_token_chunks: int = 1
    log_every_n_steps: int = 1
    compile: bool = False
    # autocast: fp32 params, bf16 autocast | bf16_weights: bf16 params, fp32 masters in the optimizer (cast once per step)
    mixed_precision: Literal["autocast", "bf16_weights"] = "autocast"

    def check(self, cfg: "Config") -> None:
        _positive(self, "train", ["max_steps", "micro_batch_size", "grad_accum", "seq_len", "ac_every_k", "mlp_token_chunks"])
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0 (got {self.lr})")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must hold two numbers (got {self.betas})")
        if self.mixed_precision == "bf16_weights":
            self._check_bf16_weights(cfg)

    def _check_bf16_weights(self, cfg: "Config") -> None:
        why = "train.mixed_precision=bf16_weights"
        if cfg.precision != "bf16":
            raise ConfigError(f"{why} needs precision=bf16 (got precision={cfg.precision})")
        if self.optimizer != "adamw":
            raise ConfigError(f"{why} keeps its fp32 master weights in AdamW; train.optimizer={self.optimizer} is not supported")
        strategy = getattr(getattr(cfg, "parallel", None), "strategy", "single")
        if strategy not in ("single", "ddp"):
            raise ConfigError(f"{why} works with parallel.strategy=single or ddp; {strategy} brings its own mixed precision")


@dataclass
class DataConfig:
    source: str = "arithmetic"  # arithmetic | chat | shakespeare | text:<file> | <path to jsonl/parquet/csv/saved dataset>
    format: Literal["auto", "text", "prompt_completion", "chat"] = "auto"
    split: str = "train"
    num_samples: int = 2000  # for built-in generated sources
    difficulty: int = 1  # arithmetic: 1 = two small operands ... 5 = multi-step
    val_fraction: float = 0.05
    packing: bool = True
    on_error: Literal["raise", "skip"] = "raise"
    shuffle: bool = True
    text_field: str = "text"
    chat_field: str = "messages"
    template_check: bool = True
    stop_token: str | None = None  # the end-of-turn token chat masks must train; default: the tokenizer's eos_token
    num_workers: int = 0

    def check(self, cfg: "Config") -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1) (got {self.val_fraction})")


@dataclass
class LoraConfig:
    enabled: bool = True
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    use_dora: bool = False
    adapters: dict[str, str] = field(default_factory=dict)  # serving: name -> adapter dir

    def check(self, cfg: "Config") -> None:
        if self.enabled and self.rank <= 0:
            raise ConfigError(f"lora.rank must be > 0 when lora.enabled=true (got {self.rank})")


@dataclass
class QuantConfig:
    load_in_4bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp32", "fp16"] = "bf16"
    quant_storage: Literal["auto", "uint8", "bf16", "fp32"] = "auto"  # auto: the param dtype under fsdp2/zero3, else uint8

    def check(self, cfg: "Config") -> None:
        if self.load_in_4bit and not cfg.lora.enabled:
            raise ConfigError(
                "quant.load_in_4bit=true needs lora.enabled=true: a 4-bit base cannot be fully fine-tuned (QLoRA trains adapters only)"
            )


@dataclass
class EvalConfig:
    every_n_steps: int = 0  # 0 = only at the end
    max_batches: int = 20
    engine_eval: bool = False  # also run engine-based task accuracy (launch/eval.py) at eval time
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    num_task_samples: int = 64


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0 = only at the end
    keep_last: int = 2
    save_final: bool = True


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "crucible"
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: offline when no API key
    id: str | None = None  # resume this W&B run (sweeps set it so a resumed trial continues its run)
    log_model: bool = False  # log the final adapter/model as a W&B artifact (works offline)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    precision: Literal["auto", "bf16", "fp32", "fp8"] = "auto"  # auto: bf16 on a GPU that supports it, else fp32 (resolved at load)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "runs/default"
    seed: int = 0
    dry_run: bool = False
    resume: str | None = None  # auto | <checkpoint path>
    # entry points other than train use these top-level keys
    host: str = "127.0.0.1"
    port: int = 8000
    run: str | None = None  # export: run dir or checkpoint
    format: str | None = None  # export: merged | awq | gguf
    sweep: str | None = None  # sweep: sweep file
    sweep_dir: str | None = None

    def section(self, name: str) -> Any:
        return getattr(self, name)


# Sections owned by other packages: name -> "module:Class". Loaded on first use.
SECTIONS: dict[str, str] = {
    "parallel": "parallel.config:ParallelConfig",
    "dpo": "alignment.config:DPOConfig",
    "grpo": "alignment.config:GRPOConfig",
    "distill": "distill.config:DistillConfig",
    "synth": "distill.config:SynthConfig",
    "engine": "engine.config:EngineConfig",
    "serve": "engine.config:ServeConfig",
    "export": "export.config:ExportConfig",
    "gguf": "export.config:GGUFConfig",
    "awq": "export.config:AWQConfig",
    "verify": "export.config:VerifyConfig",
}


def _section_classes() -> dict[str, type]:
    classes: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config) if _is_dataclass_type(f.type)}
    hints = typing.get_type_hints(Config)
    classes = {name: hints[name] for name in classes}
    for name, target in SECTIONS.items():
        module, cls = target.split(":")
        classes[name] = getattr(importlib.import_module(module), cls)
    return classes


def _is_dataclass_type(t: Any) -> bool:
    if isinstance(t, str):
        return t.endswith("Config")
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _positive(section: Any, prefix: str, names: list[str]) -> None:
    for n in names:
        if getattr(section, n) <= 0:
            raise ConfigError(f"{prefix}.{n} must be > 0 (got {getattr(section, n)})")


# --------------------------------------------------------------------------------------------
# Type coercion
# --------------------------------------------------------------------------------------------
_BOOL = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or the command line) to type ``tp``; ConfigError names ``key``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if origin is Literal:
        allowed = list(args)
        if isinstance(value, bool) and True in allowed:
            return value
        for a in allowed:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        if key.endswith("activation_checkpointing") and isinstance(value, bool):  # true/false shorthand
            return "full" if value else "none"
        if key.endswith("activation_checkpointing") and str(value).lower() in _BOOL:
            return "full" if _BOOL[str(value).lower()] else "none"
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL:
            return _BOOL[value.lower()]
        raise ConfigError(f"{key} must be true or false (got {value!r})")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer (got {value!r})")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key} must be an integer (got {value!r})") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number (got {value!r})")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number (got {value!r})") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string (got {value!r})")
        return str(value)
    if origin is list:
        (item_tp,) = args or (Any,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v] if value else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = args or (str, Any)
        if isinstance(value, str):  # name=path,name2=path2
            pairs = [p for p in value.split(",") if p]
            try:
                value = dict(p.split("=", 1) for p in pairs)
            except ValueError:
                raise ConfigError(f"{key} must look like name=value,name2=value2 (got {value!r})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (got {value!r})")
        return {coerce(key, k, key_tp): coerce(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def find_config_file(name: str, kind: str = "config") -> Path:
    """A config is looked up as given (relative to the working directory), then in configs/."""
    candidates = [Path(name), CONFIG_DIR / name]
    if not name.endswith((".yaml", ".yml")):
        candidates += [Path(name + ".yaml"), CONFIG_DIR / (name + ".yaml")]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    available = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"{kind} file {name!r} not found in {Path.cwd()} or {CONFIG_DIR}; available: {', '.join(available)}")


def read_yaml_with_extends(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config; ``extends: base.yaml`` merges the base first (looked up beside the file, then configs/)."""
    if path in _seen:
        raise ConfigError(f"config {path.name} extends itself (cycle: {' -> '.join(p.name for p in _seen + (path,))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    sibling = path.parent / base_name
    base_path = sibling if sibling.is_file() else find_config_file(base_name)
    return deep_merge(read_yaml_with_extends(base_path, _seen + (path,)), data)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(args: list[str]) -> tuple[str | None, dict[str, Any]]:
    """``["config=x.yaml", "a.b=1"]`` -> ("x.yaml", {"a": {"b": 1}}). Values are parsed as YAML scalars."""
    config_name, tree = None, {}
    for arg in args:
        if arg.startswith("--"):
            arg = arg[2:]
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value (e.g. train.lr=1e-4)")
        key, raw = arg.split("=", 1)
        key = key.strip().replace("-", "_") if key.startswith("dry") else key.strip()
        if key == "config":
            config_name = raw
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict):  # "name=path" style values parse as dicts in YAML; keep text
            value = raw
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return config_name, tree


def build_config(tree: dict[str, Any]) -> Config:
    classes = _section_classes()
    top_hints = typing.get_type_hints(Config)
    sections: dict[str, Any] = {}
    top: dict[str, Any] = {}
    all_keys = _all_keys(classes, top_hints)
    for key, value in tree.items():
        if key in classes:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; set its keys like {key}.<name>=... (allowed: {', '.join(_field_names(classes[key]))})")
            sections[key] = _build_section(key, classes[key], value, all_keys)
        elif key in top_hints:
            top[key] = coerce(key, value, top_hints[key])
        else:
            raise ConfigError(_unknown(key, all_keys))
    for name, cls in classes.items():
        sections.setdefault(name, cls())
    cfg = Config(**{k: v for k, v in sections.items() if k in top_hints}, **top)
    for name, sec in sections.items():
        if name not in top_hints:
            object.__setattr__(cfg, name, sec)
    return cfg


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _all_keys(classes: dict[str, type], top_hints: dict[str, Any]) -> list[str]:
    keys = [k for k in top_hints if k not in classes] + list(classes)
    for name, cls in classes.items():
        keys += [f"{name}.{f}" for f in _field_names(cls)]
    return keys


def _unknown(key: str, all_keys: list[str]) -> str:
    close = difflib.get_close_matches(key, all_keys, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def _build_section(name: str, cls: type, values: dict[str, Any], all_keys: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        full = f"{name}.{k}"
        if k not in hints:
            raise ConfigError(_unknown(full, all_keys))
        kwargs[k] = coerce(full, v, hints[k])
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Cross-field rules: every section's ``check(cfg)``, then the global ones."""
    if cfg.precision == "auto":
        # resolved first so every check (and the saved config) sees what will run; an explicit
        # precision=bf16 on CPU means CPU bf16 autocast, which auto never picks (slow without AMX)
        cfg.precision = _auto_precision(cfg)
    for name in list(typing.get_type_hints(Config)) + list(SECTIONS):
        sec = getattr(cfg, name, None)
        if dataclasses.is_dataclass(sec) and hasattr(sec, "check"):
            sec.check(cfg)
    if cfg.precision == "fp8":
        _require_fp8_gpu(cfg)
    if cfg.precision == "bf16" and resolve_device(cfg) == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError("precision=bf16 needs a GPU with bfloat16 support; use precision=fp32")
    return cfg


def _auto_precision(cfg: Config) -> str:
    if resolve_device(cfg) != "cuda":
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp32"


def _require_fp8_gpu(cfg: Config) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("precision=fp8 needs an NVIDIA GPU with compute capability >= 8.9 (Ada/Hopper); this machine has no GPU")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError(f"precision=fp8 needs compute capability >= 8.9 (Ada/Hopper); found {major}.{minor} ({torch.cuda.get_device_name()})")


def resolve_device(cfg: Config) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_config(argv: list[str], default_config: str | None = None) -> Config:
    """Parse ``config=NAME.yaml key=value ...`` into a validated Config."""
    name, overrides = parse_overrides(argv)
    name = name or default_config
    tree: dict[str, Any] = {}
    if name:
        path = find_config_file(name)
        tree = read_yaml_with_extends(path)
    tree = deep_merge(tree, overrides)
    cfg = build_config(tree)
    object.__setattr__(cfg, "_source", name)
    return validate(cfg)


def to_dict(cfg: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        out[f.name] = _plain(getattr(cfg, f.name))
    if isinstance(cfg, Config):
        for name in SECTIONS:
            if hasattr(cfg, name):
                out[name] = _plain(getattr(cfg, name))
    return out


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, output_dir: str | os.PathLike) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_yaml(cfg))
    os.replace(tmp, path)
    return path


def replace(cfg: Config, **dotted: Any) -> Config:
    """A copy of ``cfg`` with dotted keys changed, re-validated (used by sweeps and tests)."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate(build_config(tree))
