"""Multi-LoRA serving: PEFT adapters kept unmerged in fixed slots and applied per token, so one
forward pass serves a batch that mixes the base model and any number of loaded adapters.

Every adapted projection (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``) gets a
``LoRALayer`` in its ``Linear.adapter`` hook holding, for ``max_loras`` slots,

    A: [slots, parts, R, in]   B: [slots, out, R]   (B pre-multiplied by the adapter's scale)

where ``parts`` are the HF projections fused into the layer (q/k/v, gate/up): each part has its
own A, and the output rows of part p take ``B[rows_p] @ (A[p] @ x)``, i.e. the fused delta is the
concatenation of the per-part deltas. Ranks below ``R = max_lora_rank`` are zero-padded (exact).

The step context carries one slot per token (-1 = base). In eager steps (CPU, GPU prefill) the
runner also knows on the host which rows belong to which slot, so each group does two small dense
matmuls (segment-gather) with no device sync. Captured CUDA-graph decode steps read the slots from
a static buffer instead: two Triton kernels gather each token's A/B by its slot (BGMV shrink and
expand). Loading or unloading an adapter only rewrites its slot in place: no graph recapture.

Adapter ids (what sequences and the prefix cache see) are never reused, so KV cached under an
unloaded adapter can never be hit by a later adapter that happens to get the same slot.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.layers import Linear
from engine.loader import PACKED, canonical_name

ADAPTED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAError(ValueError):
    """An adapter that cannot be served (bad directory, unsupported PEFT feature, too large)."""


@dataclass
class LoRAAdapter:
    """A PEFT adapter read from disk: per HF module, (A [r, in], B [out, r]) and one scale."""
    path: str
    rank: int
    scale: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "model.layers.0.self_attn.q_proj" -> (A, B)
    base_model: str | None

    @classmethod
    def from_dir(cls, path: str | Path) -> "LoRAAdapter":
        path = Path(path)
        config_file = path / "adapter_config.json"
        if not config_file.is_file():
            raise LoRAError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
        c = json.loads(config_file.read_text())
        if c.get("peft_type", "LORA") != "LORA":
            raise LoRAError(f"{path}: peft_type={c.get('peft_type')} is not LoRA")
        # DoRA rescales each weight column by a norm of the *merged* weight, which a per-token delta
        # cannot express; serve it merged (export format=merged) instead.
        unsupported = {"use_dora": "DoRA adapters cannot be served unmerged; export a merged model (format=merged) and serve that",
                       "modules_to_save": "modules_to_save (fully trained layers) cannot be served as a LoRA delta; export a merged model",
                       "rank_pattern": "per-module ranks (rank_pattern) are not supported",
                       "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
                       "lora_bias": "LoRA biases (lora_bias) are not supported",
                       "fan_in_fan_out": "fan_in_fan_out adapters are not supported"}
        for key, why in unsupported.items():
            if c.get(key):
                raise LoRAError(f"{path}: {why}")
        if c.get("bias", "none") != "none":
            raise LoRAError(f"{path}: bias={c['bias']!r} is not supported (bias='none' only)")
        rank, alpha = int(c["r"]), float(c.get("lora_alpha", c["r"]))
        scale = alpha / rank ** 0.5 if c.get("use_rslora") else alpha / rank
        tensors = _read_tensors(path)
        weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            module = canonical_name(name).split(".lora_A.")[0]
            if module.rsplit(".", 1)[-1] not in HF_TARGETS:
                raise LoRAError(f"{path}: {name}: only the projections {', '.join(HF_TARGETS)} can be served as LoRA")
            b_name = name.replace(".lora_A.", ".lora_B.")
            if b_name not in tensors:
                raise LoRAError(f"{path}: {name} has no matching lora_B")
            weights[module] = (a, tensors[b_name])
        if not weights:
            raise LoRAError(f"{path}: the adapter holds no lora_A/lora_B weights")
        return cls(str(path), rank, scale, weights, c.get("base_model_name_or_path"))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(path / "adapter_model.safetensors"))
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise LoRAError(f"{path}: no adapter_model.safetensors or adapter_model.bin")


# ------------------------------------------------------------------------------------------------
# The batched delta
# ------------------------------------------------------------------------------------------------
def lora_delta_grouped(x: torch.Tensor, y: torch.Tensor, groups: list[tuple[int, torch.Tensor]], a: torch.Tensor,
                       b: torch.Tensor, output_sizes: list[int]) -> torch.Tensor:
    """Segment-gather reference: ``y[rows] += delta`` for each (slot, token rows) group."""
    for slot, rows in groups:
        v = torch.einsum("ti,pri->tpr", x[rows], a[slot])  # [t, parts, R]
        parts = b[slot].split(output_sizes)  # each [out_p, R]
        delta = torch.cat([v[:, p] @ bp.T for p, bp in enumerate(parts)], dim=-1)
        y.index_add_(0, rows, delta.to(y.dtype))
    return y


class LoRALayer:
    """The ``Linear.adapter`` hook of one projection: slot stacks plus the batched delta.
    A plain object, not a Module, so the model's parameter names (which the loader checks) stay HF's."""

    def __init__(self, linear: Linear, max_loras: int, max_rank: int, step: "StepSlots", use_triton: bool):
        self.output_sizes = list(linear.output_sizes)
        parts = len(self.output_sizes)
        w = linear.weight
        self.a = torch.zeros(max_loras, parts, max_rank, linear.in_features, dtype=w.dtype, device=w.device)
        self.b = torch.zeros(max_loras, linear.out_features, max_rank, dtype=w.dtype, device=w.device)
        self.part_offsets = torch.tensor([sum(self.output_sizes[:p]) for p in range(parts)], dtype=torch.int32, device=w.device)
        self.part_sizes = torch.tensor(self.output_sizes, dtype=torch.int32, device=w.device)
        self.step, self.use_triton = step, use_triton

    def __call__(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        if slots is None:  # a base-only batch
            return y
        if slots is self.step.slots:  # an eager step: the groups were built on the host, no sync
            return lora_delta_grouped(x, y, self.step.groups, self.a, self.b, self.output_sizes)
        if self.use_triton:  # a captured decode graph: the slots live in a static buffer
            from engine.kernels.lora_triton import bgmv_expand, bgmv_shrink

            v = bgmv_shrink(x, self.a, slots)
            return bgmv_expand(v, self.b, slots, y, self.part_offsets, self.part_sizes, max(self.output_sizes))
        groups = [(s, (slots == s).nonzero().squeeze(1)) for s in slots.unique().tolist() if s >= 0]
        return lora_delta_grouped(x, y, groups, self.a, self.b, self.output_sizes)


@dataclass
class StepSlots:
    """The current step's per-token slots and, known on the host, its (slot, token rows) groups."""
    slots: torch.Tensor | None = None
    groups: list[tuple[int, torch.Tensor]] | None = None


@dataclass
class LoadedAdapter:
    name: str
    adapter_id: int  # what sequences and the prefix-cache key carry (never reused)
    slot: int  # row of the weight stacks
    path: str
    rank: int


class LoRAManager:
    """The adapter registry of one model: installs the hooks once, then loads/unloads into slots."""

    def __init__(self, model: torch.nn.Module, max_loras: int, max_lora_rank: int):
        self.max_loras, self.max_rank = max_loras, max_lora_rank
        device = next(model.parameters()).device
        use_triton = device.type == "cuda" and _triton_available()
        self.step = StepSlots()
        self.layers: dict[str, LoRALayer] = {}
        for name, module in model.named_modules():
            if isinstance(module, Linear) and name.rsplit(".", 1)[-1] in ADAPTED:
                module.adapter = self.layers[name] = LoRALayer(module, max_loras, max_lora_rank, self.step, use_triton)
        self.adapters: dict[str, LoadedAdapter] = {}
        self.slot_by_id: dict[int, int] = {}
        self._next_id = 1  # 0 is the base model

    def load(self, name: str, path: str | Path) -> LoadedAdapter:
        if name in self.adapters:
            raise LoRAError(f"adapter {name!r} is already loaded (from {self.adapters[name].path})")
        free = sorted(set(range(self.max_loras)) - {a.slot for a in self.adapters.values()})
        if not free:
            raise LoRAError(f"all engine.max_loras={self.max_loras} adapter slots are in use; unload one first")
        adapter = LoRAAdapter.from_dir(path)
        if adapter.rank > self.max_rank:
            raise LoRAError(f"{path}: rank {adapter.rank} > engine.max_lora_rank={self.max_rank}")
        self._write_slot(free[0], adapter)
        loaded = LoadedAdapter(name, self._next_id, free[0], str(path), adapter.rank)
        self._next_id += 1
        self.adapters[name] = loaded
        self.slot_by_id[loaded.adapter_id] = loaded.slot
        return loaded

    def unload(self, name: str) -> LoadedAdapter:
        if name not in self.adapters:
            raise LoRAError(f"adapter {name!r} is not loaded")
        loaded = self.adapters.pop(name)
        del self.slot_by_id[loaded.adapter_id]
        return loaded

    @torch.no_grad()
    def _write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        staged = []  # validate everything before touching the slot, so a bad adapter leaves no trace
        for module, (a, b) in adapter.weights.items():
            *prefix, leaf = module.split(".")
            fused, part = PACKED.get(leaf, (leaf, 0))
            layer = self.layers.get(".".join(prefix + [fused]))
            if layer is None:
                raise LoRAError(f"{adapter.path}: {module} is not a projection of this model")
            rows = slice(sum(layer.output_sizes[:part]), sum(layer.output_sizes[:part + 1]))
            in_features = layer.a.shape[-1]
            if tuple(a.shape) != (adapter.rank, in_features) or tuple(b.shape) != (rows.stop - rows.start, adapter.rank):
                raise LoRAError(f"{adapter.path}: {module} has A {tuple(a.shape)}, B {tuple(b.shape)}; this base model "
                                f"needs A ({adapter.rank}, {in_features}), B ({rows.stop - rows.start}, {adapter.rank}) "
                                "(was the adapter trained on another base model?)")
            staged.append((layer, part, rows, a, b))
        for layer in self.layers.values():  # modules the adapter does not target get a zero delta
            layer.a[slot].zero_()
            layer.b[slot].zero_()
        r = adapter.rank
        for layer, part, rows, a, b in staged:
            layer.a[slot, part, :r] = a.to(layer.a.dtype)
            layer.b[slot, rows, :r] = (b.float() * adapter.scale).to(layer.b.dtype)

    def token_slots(self, adapter_ids: list[int], num_new_tokens: list[int], device: torch.device) -> torch.Tensor | None:
        """One slot per scheduled token (-1 = base), for sequences with these adapter ids and new-token
        counts; None when the whole batch runs the base model. Also records the token groups."""
        if not any(adapter_ids):
            self.step.slots = self.step.groups = None
            return None
        slots = [self.slot_by_id[i] if i else -1 for i in adapter_ids]
        per_token = torch.tensor(slots, dtype=torch.long).repeat_interleave(torch.tensor(num_new_tokens))
        rows: dict[int, list[torch.Tensor]] = {}
        start = 0
        for slot, n in zip(slots, num_new_tokens):  # a sequence's tokens are contiguous
            if slot >= 0:
                rows.setdefault(slot, []).append(torch.arange(start, start + n))
            start += n
        self.step.groups = [(s, torch.cat(r).to(device, non_blocking=True)) for s, r in sorted(rows.items())]
        self.step.slots = per_token.to(device, non_blocking=True)
        return self.step.slots


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
