"""Multi-LoRA serving: PEFT adapters kept unmerged in fixed slots and applied per token, so one
forward pass serves a batch that mixes the base model and any number of resident adapters.

Every adapted projection (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``) gets a
``LoRALayer`` in its ``Linear.adapter`` hook holding, for ``max_loras`` slots,

    A: [slots, parts, R, in]   B: [slots, out, R]   (B pre-multiplied by the adapter's scale)

where ``parts`` are the HF projections fused into the layer (q/k/v, gate/up): each part has its
own A, and the output rows of part p take ``B[rows_p] @ (A[p] @ x)``, i.e. the fused delta is the
concatenation of the per-part deltas. Ranks below ``R = max_lora_rank`` are zero-padded (exact).
The stacks never move, so captured CUDA graphs read whatever the slots hold at replay.

The step context carries one slot per token (-1 = base). On GPU two Triton kernels per projection
apply every adapter of the step (``engine/kernels/lora_triton.py``: a split-K shrink of all fused
parts into an fp32 buffer, then an expand over output-column tiles; tokens tiled by adapter); their
work list comes from the host-known groups in eager steps and is built on the device inside
captured decode graphs. The CPU path (and the numerical
reference) is the torch segment-gather ``lora_delta_grouped``.

More adapters can be registered than there are slots: ``LoRAManager.activate`` loads one on demand
from an LRU CPU cache (or its directory), evicting the least recently used idle slot. Adapter ids
(what sequences and the prefix cache see) are never reused, so KV cached under an unloaded adapter
can never be hit by a later adapter that happens to get the same slot.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.kernels.lora_segments import Segments, segments_from_groups, segments_on_device
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
    """Segment-gather reference (the CPU path): ``y[rows] += delta`` for each (slot, token rows) group."""
    for slot, rows in groups:
        v = torch.einsum("ti,pri->tpr", x[rows], a[slot])  # [t, parts, R]
        parts = b[slot].split(output_sizes)  # each [out_p, R]
        delta = torch.cat([v[:, p] @ bp.T for p, bp in enumerate(parts)], dim=-1)
        y.index_add_(0, rows, delta.to(y.dtype))
    return y


class StepSlots:
    """The current step's per-token slots (-1 = base) and, for eager steps, their (slot, token rows)
    groups known on the host. ``segments(slots)`` gives the SGMV work list: built on the host for an
    eager step, on the device for the static slot buffer of a captured graph (once per forward)."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.slots: torch.Tensor | None = None
        self.groups: list[tuple[int, torch.Tensor]] | None = None
        self._built: tuple[object, bool, Segments] | None = None  # (what it was built from, under capture, work list)

    def segments(self, slots: torch.Tensor) -> Segments:
        eager = slots is self.slots
        source = self.groups if eager else slots  # held in _built, so its identity cannot be recycled
        capturing = slots.is_cuda and torch.cuda.is_current_stream_capturing()  # a graph must record its own build
        if self._built is None or self._built[0] is not source or self._built[1] != capturing:
            segs = segments_from_groups(self.groups, slots.device) if eager else segments_on_device(slots, self.num_slots)
            self._built = (source, capturing, segs)
        return self._built[2]

    def groups_of(self, slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        if slots is self.slots:
            return self.groups
        return [(s, (slots == s).nonzero().squeeze(1)) for s in slots.unique().tolist() if s >= 0]  # syncs: reference only


class LoRALayer:
    """The ``Linear.adapter`` hook of one projection: slot stacks plus the batched delta.
    A plain object, not a Module, so the model's parameter names (which the loader checks) stay HF's."""

    def __init__(self, linear: Linear, max_loras: int, max_rank: int, step: StepSlots, use_triton: bool):
        self.output_sizes = list(linear.output_sizes)
        w = linear.weight
        self.a = torch.zeros(max_loras, len(self.output_sizes), max_rank, linear.in_features, dtype=w.dtype, device=w.device)
        self.b = torch.zeros(max_loras, linear.out_features, max_rank, dtype=w.dtype, device=w.device)
        self.step, self.use_triton = step, use_triton

    def __call__(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        if slots is None:  # a base-only batch
            return y
        if not self.use_triton:
            return lora_delta_grouped(x, y, self.step.groups_of(slots), self.a, self.b, self.output_sizes)
        from engine.kernels.lora_triton import sgmv_lora

        s = self.step.segments(slots)
        return sgmv_lora(x, y, self.a, self.b, self.output_sizes, s.rows, s.item_slot, s.item_lo, s.item_hi, s.block_m)


# ------------------------------------------------------------------------------------------------
# The registry: every servable adapter, an LRU of them in CPU memory, an LRU of them in GPU slots
# ------------------------------------------------------------------------------------------------
@dataclass
class LoadedAdapter:
    name: str
    adapter_id: int  # what sequences and the prefix-cache key carry (never reused)
    path: str
    rank: int
    slot: int | None = None  # row of the weight stacks while resident, else None
    last_used: int = 0  # the manager's clock at its last activation (LRU order of the slots)


class LoRAManager:
    """The adapters of one model. ``load`` registers an adapter (validated against the model, its
    tensors kept in an LRU CPU cache of ``max_cpu_loras``) and puts it in a free slot if there is
    one; ``activate`` makes a registered adapter resident on demand, evicting the least recently
    used slot whose adapter no request is using. An evicted adapter keeps its id, so its cached
    prefixes stay valid when it comes back; ``unload`` forgets it (and its id) for good."""

    def __init__(self, model: torch.nn.Module, max_loras: int, max_lora_rank: int, max_cpu_loras: int | None = None):
        self.max_loras, self.max_rank = max_loras, max_lora_rank
        self.max_cpu_loras = max_cpu_loras  # None: keep every registered adapter in CPU memory
        device = next(model.parameters()).device
        use_triton = device.type == "cuda" and _triton_available()
        self.step = StepSlots(max_loras)
        self.layers: dict[str, LoRALayer] = {}
        for name, module in model.named_modules():
            if isinstance(module, Linear) and name.rsplit(".", 1)[-1] in ADAPTED:
                module.adapter = self.layers[name] = LoRALayer(module, max_loras, max_lora_rank, self.step, use_triton)
        self.adapters: dict[str, LoadedAdapter] = {}  # every registered adapter, by name
        self.slot_by_id: dict[int, int] = {}  # resident adapters only
        self._cpu_cache: OrderedDict[str, LoRAAdapter] = OrderedDict()  # least recently used first
        self._next_id = 1  # 0 is the base model
        self._clock = 0

    # ---------------------------------------------------------------- registry
    def load(self, name: str, path: str | Path) -> LoadedAdapter:
        """Register ``name`` and make it resident if a slot is free (else it waits in CPU memory)."""
        if name in self.adapters:
            raise LoRAError(f"adapter {name!r} is already loaded (from {self.adapters[name].path})")
        adapter = self._read(path)
        self._stage(adapter)  # refuse an adapter of another base model now, not when a request needs it
        loaded = LoadedAdapter(name, self._next_id, str(path), adapter.rank)
        self._next_id += 1
        self.adapters[name] = loaded
        self._cache(name, adapter)
        if self._free_slots():
            self.activate(name)
        return loaded

    def unload(self, name: str) -> LoadedAdapter:
        if name not in self.adapters:
            raise LoRAError(f"adapter {name!r} is not loaded")
        loaded = self.adapters.pop(name)
        self._cpu_cache.pop(name, None)
        self._evict(loaded)
        return loaded

    def resident(self) -> list[LoadedAdapter]:
        return [a for a in self.adapters.values() if a.slot is not None]

    # ---------------------------------------------------------------- slots
    def activate(self, name: str, busy_ids: set[int] = frozenset()) -> LoadedAdapter | None:
        """Make a registered adapter resident (a no-op if it is). Takes a free slot, else evicts the
        least recently used resident adapter whose id is not in ``busy_ids`` (adapters that requests in
        the engine still need). None when every slot is busy: retry after some requests finish."""
        loaded = self.adapters[name]
        self._clock += 1
        if loaded.slot is None:
            free = self._free_slots()
            if not free:
                idle = [a for a in self.resident() if a.adapter_id not in busy_ids]
                if not idle:
                    return None
                victim = min(idle, key=lambda a: a.last_used)
                free = [victim.slot]
                self._evict(victim)
            adapter = self._cpu_cache.get(name) or self._read(loaded.path)
            self._cache(name, adapter)
            self._write_slot(free[0], adapter)
            loaded.slot = free[0]
            self.slot_by_id[loaded.adapter_id] = loaded.slot
        loaded.last_used = self._clock
        return loaded

    def _free_slots(self) -> list[int]:
        return sorted(set(range(self.max_loras)) - {a.slot for a in self.resident()})

    def _evict(self, loaded: LoadedAdapter) -> None:
        if loaded.slot is not None:
            del self.slot_by_id[loaded.adapter_id]
            loaded.slot = None

    def _cache(self, name: str, adapter: LoRAAdapter) -> None:
        self._cpu_cache[name] = adapter
        self._cpu_cache.move_to_end(name)
        while self.max_cpu_loras is not None and len(self._cpu_cache) > self.max_cpu_loras:
            self._cpu_cache.popitem(last=False)  # re-read from its directory if it is needed again

    def cached_on_cpu(self) -> list[str]:
        return list(self._cpu_cache)

    def _read(self, path: str | Path) -> LoRAAdapter:
        adapter = LoRAAdapter.from_dir(path)
        if adapter.rank > self.max_rank:
            raise LoRAError(f"{path}: rank {adapter.rank} > engine.max_lora_rank={self.max_rank}")
        return adapter

    def _stage(self, adapter: LoRAAdapter) -> list[tuple[LoRALayer, int, slice, torch.Tensor, torch.Tensor]]:
        """(layer, part, output rows, A, B) per adapted module, every shape checked against the model."""
        staged = []
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
        return staged

    @torch.no_grad()
    def _write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        staged = self._stage(adapter)
        for layer in self.layers.values():  # modules the adapter does not target get a zero delta
            layer.a[slot].zero_()
            layer.b[slot].zero_()
        r = adapter.rank
        for layer, part, rows, a, b in staged:
            layer.a[slot, part, :r] = a.to(layer.a.dtype)
            layer.b[slot, rows, :r] = (b.float() * adapter.scale).to(layer.b.dtype)

    # ---------------------------------------------------------------- per step
    def token_slots(self, adapter_ids: list[int], num_new_tokens: list[int], device: torch.device) -> torch.Tensor | None:
        """One slot per scheduled token (-1 = base), for sequences with these adapter ids and new-token
        counts; None when the whole batch runs the base model. Also records the token groups."""
        if not any(adapter_ids):
            self.step.slots = self.step.groups = None
            return None
        slots = [self.slot_by_id[i] if i else -1 for i in adapter_ids]
        rows: dict[int, list[int]] = {}
        start = 0
        for slot, n in zip(slots, num_new_tokens):  # a sequence's tokens are contiguous
            if slot >= 0:
                rows.setdefault(slot, []).extend(range(start, start + n))
            start += n
        per_token = torch.tensor(slots, dtype=torch.long).repeat_interleave(torch.tensor(num_new_tokens))
        order = sorted(rows)
        host = torch.cat([per_token, torch.tensor([r for s in order for r in rows[s]], dtype=torch.long)])
        on_device = host.to(device, non_blocking=True)  # one copy for the slots and every group's rows
        self.step.slots, sorted_rows = on_device.split([len(per_token), len(host) - len(per_token)])
        sizes = [len(rows[s]) for s in order]
        self.step.groups = list(zip(order, sorted_rows.split(sizes)))
        return self.step.slots


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
