"""What is being exported (``run=``), and the model it stands for: LoRA/DoRA/QLoRA folded into the base.

``run=`` may name a trainer run dir (``<run>/final`` or the newest ``<run>/checkpoints/step-N/model``),
an HF model dir, a PEFT adapter dir, or a built-in alias. Every exporter starts from
``merged_model(source)``; the verifier compares against ``reference_model(source)`` — the model as
training saw it (for QLoRA: the bitsandbytes NF4 base with the adapter applied on top).

QLoRA merge: the base weights used are the NF4 base's own dequantized weights (read back from the
quantized modules of the reference, so they are exactly what the training forward multiplied by);
the adapter delta is added in fp32 and never re-rounded into NF4.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from trainer.config import ConfigError
from trainer.models import EMBEDDED_MODELS, exact_4bit_cpu_forward, resolve_model_path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Source:
    path: str  # the directory run= resolved to (model or adapter)
    base_dir: str  # HF directory holding the (base) weights
    adapter_dir: str | None = None
    qlora: bool = False
    quant: dict = field(default_factory=dict)  # the run's quant.* section when qlora
    method: str = "full"  # full | lora | dora | qlora

    @property
    def config(self) -> dict:
        return json.loads((Path(self.base_dir) / "config.json").read_text())

    @property
    def tokenizer_dir(self) -> str:
        if self.adapter_dir and (Path(self.adapter_dir) / "tokenizer.json").is_file():
            return self.adapter_dir
        return self.base_dir


def _newest_checkpoint(run: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in (run / "checkpoints").glob("step-*") if (m := re.fullmatch(r"step-(\d+)", p.name))]
    for _, p in sorted(steps, reverse=True):
        if (p / "model").is_dir():
            return p / "model"
    return None


def _model_dir(path: Path) -> Path | None:
    """The model or adapter directory inside ``path`` (itself, final/, or the newest checkpoint)."""
    for candidate in (path, path / "final", path / "model"):
        if (candidate / "adapter_config.json").is_file() or (candidate / "config.json").is_file():
            return candidate
    newest = _newest_checkpoint(path)
    return _model_dir(newest) if newest else None


def _run_quant(adapter_dir: Path) -> dict:
    """The quant section of the run that produced ``adapter_dir`` (config.yaml in it or a parent)."""
    for parent in [adapter_dir, *list(adapter_dir.parents)[:4]]:
        cfg_file = parent / "config.yaml"
        if cfg_file.is_file():
            return (yaml.safe_load(cfg_file.read_text()) or {}).get("quant") or {}
    return {}


def resolve_source(run: str | None, qlora: str = "auto") -> Source:
    """``run=`` -> Source. ``qlora``: auto (from the adapter/run config) | true | false."""
    if not run:
        raise ConfigError("run= is required: a run dir, checkpoint, HF model dir, adapter dir or " + ", ".join(EMBEDDED_MODELS))
    if run in EMBEDDED_MODELS:
        path = Path(resolve_model_path(run))
    else:
        given = Path(run).expanduser()
        if not given.exists():
            raise ConfigError(f"run={run!r} does not exist (expected a run dir, checkpoint, model dir or {', '.join(EMBEDDED_MODELS)})")
        path = _model_dir(given)
        if path is None:
            raise ConfigError(f"run={run!r} holds no model: looked for adapter_config.json or config.json in it, final/, model/ "
                              "and checkpoints/step-N/model/")
    if (path / "adapter_config.json").is_file():
        acfg = json.loads((path / "adapter_config.json").read_text())
        if acfg.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"run={run!r}: adapter type {acfg.get('peft_type')!r} is not supported (LoRA/DoRA only)")
        base = acfg.get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{path / 'adapter_config.json'} has no base_model_name_or_path")
        base_dir = resolve_model_path(base)
        if not Path(base_dir).is_dir():
            raise ConfigError(f"run={run!r}: base model {base!r} is not a local directory (models are never downloaded at export)")
        quant = _run_quant(path)
        is_qlora = bool(quant.get("load_in_4bit")) if qlora == "auto" else qlora == "true"
        method = "qlora" if is_qlora else ("dora" if acfg.get("use_dora") else "lora")
        src = Source(str(path), base_dir, str(path), is_qlora, quant if is_qlora else {}, method)
    else:
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ConfigError(f"run={run!r}: {path} has config.json but no weights (*.safetensors)")
        src = Source(str(path), str(path))
    model_type = src.config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"run={run!r}: model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if src.config.get("quantization_config"):
        method = src.config["quantization_config"].get("quant_method")
        raise ConfigError(f"run={run!r} is already quantized ({method}); export from the full-precision model")
    return src


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _load_base(base_dir: str, dtype: torch.dtype = torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, **kwargs).eval()


def _nf4_base(src: Source):
    from transformers import BitsAndBytesConfig

    q = src.quant
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.get("quant_type", "nf4"), bnb_4bit_use_double_quant=q.get("double_quant", True),
        bnb_4bit_compute_dtype=_DTYPES[q.get("compute_dtype", "fp32") if torch.cuda.is_available() else "fp32"],
    )
    model = _load_base(src.base_dir, torch.float32, quantization_config=bnb, device_map={"": "cpu"})
    exact_4bit_cpu_forward(model)  # the reference is the training forward: dequantize + fp32 matmul
    return model


def reference_model(src: Source):
    """The model as training evaluated it: base (NF4 for QLoRA) with the adapter unmerged on top."""
    if src.adapter_dir is None:
        return _load_base(src.base_dir)
    from peft import PeftModel

    base = _nf4_base(src) if src.qlora else _load_base(src.base_dir)
    return PeftModel.from_pretrained(base, src.adapter_dir).eval()


def dequantized_nf4_state(model) -> dict[str, torch.Tensor]:
    """fp32 weights of every bitsandbytes 4-bit linear in ``model``: dequantize(quantize_nf4(W))."""
    import bitsandbytes.functional as bnbf

    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and getattr(weight, "quant_state", None) is not None:
            clean = re.sub(r"^(base_model\.model\.)", "", name).replace(".base_layer", "")
            out[clean + ".weight"] = bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return out


def merged_model(src: Source, reference=None):
    """An fp32 transformers model with the adapter folded in (the source model itself when full)."""
    if src.adapter_dir is None:
        return reference if reference is not None else _load_base(src.base_dir)
    from peft import PeftModel

    base = _load_base(src.base_dir)
    if src.qlora:
        ref = reference if reference is not None else reference_model(src)
        nf4 = dequantized_nf4_state(ref)
        missing = [k for k in nf4 if k not in base.state_dict()]
        if missing:
            raise RuntimeError(f"NF4 weights {missing[:3]} have no counterpart in the base model")
        base.load_state_dict(nf4, strict=False)
    merged = PeftModel.from_pretrained(base, src.adapter_dir).merge_and_unload()
    return merged.eval()


def save_merged(model, src: Source, out_dir: str | Path, dtype: str = "auto") -> None:
    """An HF directory transformers loads: weights, config, tokenizer + chat template, generation config."""
    from transformers import AutoTokenizer, GenerationConfig

    target = _DTYPES.get(dtype) if dtype != "auto" else _DTYPES.get({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(
        str(src.config.get("dtype") or src.config.get("torch_dtype") or "float32"), "fp32"))
    model = model.to(target)
    model.config.dtype = target
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(src.tokenizer_dir).save_pretrained(out_dir)
    if (Path(src.base_dir) / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(src.base_dir).save_pretrained(out_dir)
