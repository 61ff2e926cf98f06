"""HF checkpoints -> our modules: safetensors files, trainer tensors (``update_weights``), PEFT adapters.

One name map serves all three: HF names (``model.layers.0.self_attn.q_proj.weight``), with the
wrappers training adds (``base_model.model.``, ``.base_layer``, ``_orig_mod.``, ``module.``) peeled
off, are routed into the fused ``qkv_proj`` / ``gate_up_proj`` slices.

AWQ checkpoints (AutoAWQ GEMM layout) keep their int4 weights: before loading, every projection
the checkpoint stores as ``qweight``/``qzeros``/``scales`` is swapped for an ``engine.quant.AWQLinear``
and those three tensors are routed like any other (fused parts are column slices).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from engine.layers import Linear
from engine.model import CausalLM
from engine.quant import PACKED_LEAVES, AWQLinear, awq_group_size

# HF projection -> (our fused module, which part)
PACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
_WRAPPERS = re.compile(r"^(?:_orig_mod\.|module\.|_fsdp_wrapped_module\.|_checkpoint_wrapped_module\.)+|(?<=\.)(?:_orig_mod\.|_fsdp_wrapped_module\.|_checkpoint_wrapped_module\.)")


def canonical_name(name: str) -> str:
    """Peel training wrappers off a parameter name, leaving the plain HF name."""
    name = _WRAPPERS.sub("", name)
    if name.startswith("base_model.model."):  # PEFT
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".")


def _route(model: CausalLM, params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The destination tensor (or the slice of a fused one) for HF parameter ``name``."""
    hf_name = canonical_name(name)
    if ".lora_" in hf_name or "lora_magnitude" in hf_name:
        raise ValueError(f"{name}: unmerged LoRA weights cannot be loaded; merge the adapter first (peft merge_and_unload)")
    *prefix, module, leaf = hf_name.split(".")
    target = ".".join(prefix + [PACKED.get(module, (module,))[0]])
    if leaf == "weight" and isinstance(_submodule(model, target), AWQLinear):
        raise ValueError(f"{name}: {target} holds AWQ int4 weights (qweight/qzeros/scales), which fp weights cannot be "
                         "written or merged into; serve LoRA adapters unmerged (enable_lora) or load an fp checkpoint")
    if module in PACKED:
        fused, part = PACKED[module]
        fused_name = ".".join(prefix + [fused, leaf])
        if fused_name in params:
            return model.get_submodule(".".join(prefix + [fused])).shard(params[fused_name], part)
    elif hf_name in params:
        return params[hf_name]
    raise ValueError(f"{name}: no such parameter in this {model.args.model_type} model")


def _submodule(model: CausalLM, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _destinations(model: CausalLM, remove_duplicate: bool = False) -> dict[str, torch.Tensor]:
    """Every loadable tensor by name: the parameters and the packed int4 buffers of AWQ layers
    (with ``remove_duplicate``, a tied LM head is listed once, as the embedding)."""
    named = dict(model.named_parameters(remove_duplicate=remove_duplicate))
    named.update((n, b) for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in PACKED_LEAVES)
    return named


@torch.no_grad()
def load_named_tensors(model: CausalLM, named: Iterable[tuple[str, torch.Tensor]], add: bool = False) -> set[str]:
    """Copy (or, with ``add``, accumulate) tensors into the model in place; returns the HF names written."""
    written = set()
    params = _destinations(model)
    for name, tensor in named:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        dest = _route(model, params, name)
        if dest.shape != tensor.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match the model's {tuple(dest.shape)}")
        src = tensor.to(device=dest.device, dtype=dest.dtype)
        dest.add_(src) if add else dest.copy_(src)
        written.add(canonical_name(name))
    for module in model.modules():
        if isinstance(module, AWQLinear):
            module.packed_changed()
    return written


def _safetensors_items(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors files (the engine loads safetensors checkpoints)")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys += list(f.keys())
    return keys


def swap_awq_linears(model: CausalLM, quantized: set[str], group: int) -> list[str]:
    """Replace each Linear whose HF parts are all in ``quantized`` (HF module names) by an AWQLinear.

    A fused projection with only some parts quantized cannot be one int4 GEMM: that is an error."""
    parts_of = {}
    for hf, (fused, _) in PACKED.items():
        parts_of.setdefault(fused, []).append(hf)
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear) or isinstance(module, AWQLinear):
            continue
        *prefix, leaf = name.split(".")
        parts = [".".join(prefix + [p]) for p in parts_of.get(leaf, [leaf])]
        present = [p in quantized for p in parts]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"{name}: the checkpoint quantizes only {[p for p, q in zip(parts, present) if q]} of the fused {parts}")
        model.set_submodule(name, AWQLinear.replacing(module, group))
        swapped.append(name)
    return swapped


def load_checkpoint(model: CausalLM, path: str | Path) -> None:
    """Load every weight of an HF safetensors directory; a missing weight is an error, not random init.

    An AWQ checkpoint's quantized projections become AWQLinear modules first (weights stay int4)."""
    args, path = model.args, Path(path)
    group = awq_group_size(path)
    if group is not None:
        quantized = {k.removesuffix(".qweight") for k in _safetensors_keys(path) if k.endswith(".qweight")}
        swap_awq_linears(model, {canonical_name(q) for q in quantized}, group)
    items = ((n, t) for n, t in _safetensors_items(path) if not (args.tie_word_embeddings and n == "lm_head.weight"))
    written = load_named_tensors(model, items)
    expected = {hf for hf in _hf_names(model)}
    missing = sorted(expected - written)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")


def _hf_names(model: CausalLM) -> Iterator[str]:
    """The HF tensor names the model needs (fused params expanded back into their parts)."""
    unpacked: dict[str, list[str]] = {}
    for hf, (fused, _) in PACKED.items():
        unpacked.setdefault(fused, []).append(hf)
    for name in _destinations(model, remove_duplicate=True):
        *prefix, module, leaf = name.split(".")
        for part in unpacked.get(module, [module]):
            yield ".".join(prefix + [part, leaf])


@torch.no_grad()
def merge_lora_adapter(model: CausalLM, adapter_dir: str | Path) -> None:
    """Add a PEFT LoRA adapter's ``scale * B @ A`` into the base weights (for evaluation)."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    config = json.loads(config_file.read_text())
    if config.get("use_dora"):
        raise ValueError(f"{adapter_dir}: DoRA adapters cannot be merged by the engine; export a merged checkpoint instead")
    if config.get("modules_to_save"):
        raise ValueError(f"{adapter_dir}: adapters with modules_to_save are not supported; export a merged checkpoint instead")
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    tensors = dict(_safetensors_items(adapter_dir))
    deltas = []
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        base_name = name.replace(".lora_A.default", "").replace(".lora_A", "")
        delta = (b.float() @ a.float()) * scale
        deltas.append((base_name, delta))
    if not deltas:
        raise ValueError(f"{adapter_dir}: the adapter holds no lora_A/lora_B weights")
    load_named_tensors(model, deltas, add=True)


def materialize_gguf(path: str | Path) -> str:
    """A GGUF model file -> an HF directory (config, dequantized safetensors, tokenizer) cached beside it.

    llama.cpp files carry their own tokenizer and the interleaved Q/K layout; reading them through
    ``export.gguf_io`` undoes the permutation, so the engine runs exactly what llama.cpp would.
    """
    from safetensors.torch import save_file

    from export.gguf_io import read_gguf_model

    path = Path(path).resolve()
    out = path.parent / f".{path.name}.hf"
    stamp = f"{path.stat().st_size}-{path.stat().st_mtime_ns}"
    if (out / ".source").is_file() and (out / ".source").read_text() == stamp:
        return str(out)
    config, state, tokenizer = read_gguf_model(path, with_tokenizer=True)
    tmp = path.parent / f".{path.name}.hf.tmp"
    tmp.mkdir(exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    (tmp / ".source").write_text(stamp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return str(out)
