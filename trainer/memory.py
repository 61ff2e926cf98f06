"""Peak memory per rank, estimated from the config alone (``dry_run=true``).

The estimate is a sum of named rows (weights, gradients, optimizer states, transient gathered
weights, activations, logits), each a closed formula of the model shape and the config, and it
states the assumptions it makes. For full fine-tuning with BF16 mixed precision the model-state
rows reduce to the ZeRO paper's numbers per parameter Ψ on N ranks:

    ddp / single  16Ψ          (our scheme: fp32 params + fp32 grads + Adam; plus 2Ψ autocast copies)
    zero1         (2 + 2 + 12/N)Ψ
    zero2         (2 + 14/N)Ψ
    zero3, fsdp2  16Ψ/N        (+ the layers gathered for the current forward/backward)

On CPU (fp32 everywhere) DeepSpeed keeps no separate master copy: (4 + 4 + 8/N)Ψ, (4 + 12/N)Ψ, 16Ψ/N.
(DeepSpeed's ZeRO-1 without gradient accumulation reduces each gradient straight into the rank's
partition, so it holds ZeRO-2's 2Ψ/N of gradients, not 2Ψ.)

DeepSpeed adds buffers the paper's table leaves out, read from the resolved DeepSpeed config
(``parallel.zero.resolved_deepspeed_config``, the one the run passes to ``deepspeed.initialize``):
the gradient buckets (two of ``reduce_bucket_size`` under ``overlap_comm`` for stages 1-2, one
persistent one for stage 3) and, inside ``step()``, a flattened copy of the gradient partition and
its fp32 cast. Rows held through forward/backward and rows that exist only during the optimizer
step are kept apart: the peak is the larger of the two phases, not their sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1024**3

_NF4_BLOCK = 64  # bitsandbytes 4-bit block size: one absmax per 64 weights
_DQ_BLOCK = 256  # double quant: absmax quantized to 8 bit in blocks of 256, one fp32 scale each


@dataclass
class MemoryEstimate:
    rows: list[tuple[str, float]]  # (what, bytes per rank) held at the forward/backward peak
    total: float  # bytes per rank at peak: the larger of the two phases
    assumptions: list[str] = field(default_factory=list)
    title: str = "estimated peak memory per rank"
    step_rows: list[tuple[str, float]] = field(default_factory=list)  # extra, only inside the optimizer step
    step_total: float = 0.0  # bytes per rank inside the optimizer step (activations are free by then)

    @property
    def peak_phase(self) -> str:
        return "optimizer step" if self.step_rows and self.step_total >= self.total else "forward/backward"

    def format_table(self) -> str:
        """Plain-text table (logs, tests)."""
        width = max(len(name) for name, _ in self.rows + self.step_rows + [("total", 0)])
        lines = [self.title]
        lines += [f"  {name:<{width}}  {b / GiB:9.3f} GiB" for name, b in self.rows]
        if self.step_rows:
            lines.append("  inside the optimizer step (activations freed):")
            lines += [f"  {name:<{width}}  {b / GiB:9.3f} GiB" for name, b in self.step_rows]
        lines.append(f"  {'total':<{width}}  {self.total / GiB:9.3f} GiB  (peak in the {self.peak_phase})")
        lines += ["assumptions:"] + [f"  - {a}" for a in self.assumptions]
        return "\n".join(lines)

    def rich_table(self):
        """A rich renderable: the rows as a table, then the assumptions as a list."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=self.title)
        table.add_column("component")
        table.add_column("GiB", justify="right")
        table.add_column("share", justify="right")
        for name, b in self.rows:
            table.add_row(name, f"{b / GiB:.3f}", f"{100 * b / self.total:.0f}%" if self.total else "-")
        for name, b in self.step_rows:
            table.add_row(f"[dim]step only:[/] {name}", f"{b / GiB:.3f}", "")
        table.add_row(f"[bold]total[/] ({self.peak_phase})", f"[bold]{self.total / GiB:.3f}", "100%", end_section=True)
        return Group(table, Text("\n".join(f"- {a}" for a in self.assumptions), style="dim"))


@dataclass
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_hf(cls, c) -> "ModelShape":
        heads = c.num_attention_heads
        return cls(
            vocab=c.vocab_size, hidden=c.hidden_size, layers=c.num_hidden_layers, heads=heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            intermediate=c.intermediate_size, tied=bool(getattr(c, "tie_word_embeddings", False)),
            qkv_bias=bool(getattr(c, "attention_bias", False)) or getattr(c, "model_type", "") == "qwen2",
        )

    def layer_linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear in one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.layer_linears().values())

    @property
    def layer_other_params(self) -> int:  # two RMSNorms (+ q/k/v biases)
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return 2 * self.hidden + bias

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + self.layer_other_params

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, untied LM head."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def total_params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def lora_params(self, rank: int, targets: list[str]) -> int:
        return self.layers * sum(rank * (i + o) for name, (i, o) in self.layer_linears().items() if name in targets)

    def activation_bytes_per_token(self, mixed: bool, lora: bool) -> float:
        """Bytes autograd saves per token in one decoder layer (SDPA attention, SwiGLU MLP).

        Fitted to the HF Llama graph by counting the storages autograd saves (tests check it):
        fp32: 11h + 2kv + 4i values (norm inputs/outputs, q/k/v before and after RoPE, attention
        output, residual; the MLP's gate, up, silu(gate) and product). Under bf16 autocast the
        RMSNorms still save four fp32 h-vectors; the rest (9h + 2kv + 4.5i) is bf16. LoRA adds a
        rank-r intermediate per adapted linear: small, counted as 5% of h.
        """
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        extra = 0.05 * h if lora else 0.0
        if mixed:
            return 4 * 4 * h + 2 * (9 * h + 2 * kv + 4.5 * i + extra)
        return 4 * (11 * h + 2 * kv + 4 * i + extra)

    def mlp_bytes_per_token(self, mixed: bool) -> float:
        """The MLP's ``[tokens, intermediate]`` share of ``activation_bytes_per_token``."""
        return 2 * 4.5 * self.intermediate if mixed else 4 * 4 * self.intermediate


def _sharding(strategy: str, grad_accum: int) -> tuple[bool, bool, bool]:
    """(weights, gradients, optimizer states) sharded over ranks?

    DeepSpeed's ZeRO-1 reduces every gradient into the owning rank's partition at the accumulation
    boundary; with ``grad_accum=1`` every backward is one, so only partitioned gradients are kept.
    """
    return {
        "single": (False, False, False), "ddp": (False, False, False),
        "zero1": (False, grad_accum == 1, True), "zero2": (False, True, True),
        "zero3": (True, True, True), "fsdp2": (True, True, True),
    }[strategy]


# Rows freed before the optimizer step runs (everything else lives through it).
_FREED_BEFORE_STEP = ("gathered weights", "autocast", "activations", "logits", "DeepSpeed gradient buckets")


def estimate_memory(cfg, hf_config, world_size: int = 1) -> MemoryEstimate:
    """Peak bytes per rank for training ``cfg`` on a model shaped like ``hf_config`` over ``world_size`` ranks."""
    from trainer.config import resolve_device

    shape = ModelShape.from_hf(hf_config)
    strategy = cfg.parallel.strategy
    n = max(1, world_size) if strategy != "single" else 1
    on_gpu = resolve_device(cfg) == "cuda"
    autocast = cfg.precision in ("bf16", "fp8")  # the trainer autocasts to bf16 on any device
    mixed = on_gpu and autocast  # bf16 *storage* (LoRA base, DeepSpeed model, FSDP2 gathers) only on GPU
    deepspeed = strategy.startswith("zero")
    act_bytes = 2 if autocast else 4
    shard_w, shard_g, shard_o = _sharding(strategy, cfg.train.grad_accum)
    per = lambda sharded: 1 / n if sharded else 1.0  # noqa: E731
    eight_bit = "8bit" in cfg.train.optimizer
    adam_bytes = 2 if eight_bit else 8  # m and v: fp32 each, or one byte each (+ block scales, ignored)
    rows: list[tuple[str, float]] = []
    notes = [f"{shape.total_params / 1e6:.1f}M parameters, {shape.layers} layers, {n} rank(s), strategy={strategy}"]

    lora = cfg.lora.enabled
    qlora = lora and cfg.quant.load_in_4bit
    psi = shape.total_params
    if lora:
        trainable = shape.lora_params(cfg.lora.rank, cfg.lora.target_modules)
        linear = shape.layers * shape.layer_linear_params
        frozen_other = psi - linear
        base_bytes = 2 if mixed else 4  # trainer.models.param_dtype: frozen base in bf16 on GPU
        if qlora:
            absmax = (1 / _NF4_BLOCK + 4 / (_NF4_BLOCK * _DQ_BLOCK)) if cfg.quant.double_quant else 4 / _NF4_BLOCK
            base = linear * (0.5 + absmax) + frozen_other * base_bytes
            notes.append(f"NF4 base: 0.5 B/param + {absmax:.4f} B/param block constants; embeddings/norms/head in "
                         f"{'bf16' if base_bytes == 2 else 'fp32'} (the frozen base dtype)")
        else:
            base = psi * base_bytes
        rows.append(("frozen base weights" + (" (sharded)" if shard_w else ""), base * per(shard_w)))
        notes.append(f"LoRA r={cfg.lora.rank} on {len(cfg.lora.target_modules)} modules: {trainable / 1e6:.2f}M trainable")
    else:
        trainable = psi

    # Trainable weights, gradients and optimizer states (the ZeRO table).
    if deepspeed and mixed:
        rows += [("trainable weights (bf16)", 2 * trainable * per(shard_w)),
                 ("gradients (bf16)", 2 * trainable * per(shard_g)),
                 ("optimizer: fp32 master + Adam", (4 + adam_bytes) * trainable * per(shard_o))]
        notes.append("DeepSpeed bf16: bf16 model and gradients, fp32 master weights inside the optimizer")
    else:
        rows += [("trainable weights (fp32)", 4 * trainable * per(shard_w)),
                 ("gradients (fp32)", 4 * trainable * per(shard_g)),
                 ("optimizer: Adam states", adam_bytes * trainable * per(shard_o))]
        notes.append("trainable weights, gradients and optimizer states in fp32" + (" (CPU or precision=fp32)" if not mixed else ""))
    if strategy == "zero1" and shard_g:
        notes.append("zero1 with train.grad_accum=1: DeepSpeed keeps only this rank's gradient partition")
    if eight_bit:
        notes.append(f"train.optimizer={cfg.train.optimizer}: 2 bytes of Adam state per trainable parameter")
    if cfg.parallel.offload == "optimizer" or (cfg.parallel.offload == "params" and not shard_w):
        rows = [(name, 0.0) if name.startswith("optimizer") else (name, b) for name, b in rows]
        notes.append("parallel.offload: optimizer states live in host memory (not counted)")
    if cfg.parallel.offload == "params" and shard_w:
        rows = [(name, 0.0) if name.startswith(("optimizer", "trainable weights", "frozen base", "gradients")) else (name, b) for name, b in rows]
        notes.append("parallel.offload=params: sharded weights, gradients and optimizer states live in host memory")

    step_rows: list[tuple[str, float]] = []
    ds_layers = None
    if deepspeed:
        buffer_rows, step_rows, ds_layers, ds_notes = _deepspeed_buffers(cfg, hf_config, shape, trainable, n, on_gpu, mixed)
        rows += buffer_rows
        notes += ds_notes

    # Transient full-size weights: gathered layers (sharded weights) or autocast's bf16 copies.
    w_bytes = (0.5 if qlora else (2 if mixed else 4))
    if shard_w:
        live_layers = ds_layers or (shape.layers if (strategy == "fsdp2" and not cfg.parallel.reshard_after_forward) else 2)
        gathered = (shape.root_params * (4 if qlora else w_bytes) + live_layers * shape.layer_params * w_bytes) * (1 - 1 / n)
        rows.append((f"gathered weights (root + {live_layers} layers)", gathered))
        if strategy == "fsdp2" and not cfg.parallel.reshard_after_forward:
            notes.append("fsdp2 reshard_after_forward=false: every layer stays gathered from forward to backward")
        elif live_layers == 2:
            notes.append("sharded weights: the root (embeddings, head) plus the current and prefetched layer are unsharded at once")
    elif autocast and not qlora and not (mixed and (lora or deepspeed)):
        rows.append(("autocast bf16 weight copies", 2 * psi))
        notes.append("bf16 autocast of fp32 weights: each linear keeps its bf16 weight copy for the backward")

    rows += _activation_rows(cfg, shape, autocast, lora, act_bytes, notes)
    if cfg.train.method == "dpo" and not lora:
        rows.append(("reference model (frozen)", psi * (2 if mixed else 4) * per(shard_w)))
    if cfg.train.method in ("grpo", "distill"):
        notes.append(f"train.method={cfg.train.method}: rollout engine KV cache / teacher model are not included")
    notes.append("allocator fragmentation and the CUDA context (~0.5 GiB) are not included")
    if step_rows:
        notes.append("peak = the larger of forward/backward (all rows above) and the optimizer step (rows kept through it "
                     "plus the step-only rows; activations, logits and gradient buckets are free by then)")
    backward_total = sum(b for _, b in rows)
    kept_through_step = sum(b for name, b in rows if not name.startswith(_FREED_BEFORE_STEP))
    step_total = kept_through_step + sum(b for _, b in step_rows)
    return MemoryEstimate(rows=rows, total=max(backward_total, step_total), assumptions=notes,
                          step_rows=step_rows, step_total=step_total)


def _activation_rows(cfg, shape: ModelShape, autocast: bool, lora: bool, act_bytes: int, notes: list[str]) -> list[tuple[str, float]]:
    """Saved activations (per checkpointing mode) and the logits + loss of one micro-batch."""
    from parallel.activation import checkpointed_layer_indices

    mult = 2 if cfg.train.method == "dpo" else 1  # chosen + rejected in one micro-batch
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len * mult
    full_layer = shape.activation_bytes_per_token(autocast, lora) * tokens
    boundary = shape.hidden * tokens * act_bytes  # a checkpointed layer keeps only its input
    mode = cfg.train.activation_checkpointing
    recomputed_now = 0.0  # a checkpointed layer being recomputed: exists in the backward only
    if mode == "offload":
        act = full_layer  # one layer in flight on the device, the rest in host memory
        notes.append(f"activation offload: {shape.layers * full_layer / GiB:.2f} GiB of activations in host memory")
    else:
        k = len(checkpointed_layer_indices(shape.layers, mode, cfg.train.ac_every_k))
        slices = cfg.train.mlp_token_chunks
        if k:  # + one recomputed layer, whose MLP works one token slice at a time under train.mlp_token_chunks
            recomputed_now = full_layer - shape.mlp_bytes_per_token(autocast) * tokens * (1 - 1 / slices)
            if slices > 1:
                notes.append(f"MLP over {slices} token slices: the recomputed layer holds 1/{slices} of its MLP buffers")
        act = (shape.layers - k) * full_layer + k * boundary + recomputed_now
    notes.append(f"activations in {'bf16' if act_bytes == 2 else 'fp32'}; SDPA uses a fused kernel (no T x T matrix kept)")
    chunk = cfg.train.loss_chunk_size
    logit_tokens = min(chunk, tokens) if chunk > 0 else tokens
    per_chunk = f", {chunk} tokens per loss chunk" if chunk > 0 else ""
    # SFT with an unsharded LM head takes the fused linear + CE (trainer.losses): one chunk's logits
    # in the compute dtype and one fp32 buffer, plus the hidden-state gradient it keeps for backward
    # (a frozen ZeRO-3 head, as under LoRA, is gathered for the fused forward: trainer.losses)
    strategy = getattr(cfg.parallel, "strategy", "single")
    fused = cfg.train.method == "sft" and (strategy not in ("fsdp2", "zero3") or (strategy == "zero3" and lora))
    if fused:
        notes.append("fused linear + cross-entropy: one chunk's logits and one fp32 buffer" + per_chunk)
        transient = logit_tokens * shape.vocab * (act_bytes + 4)
        kept = tokens * shape.hidden * act_bytes  # the hidden-state gradient, taken in the forward
        if not lora:  # a trainable head: its gradient (fp32 accumulator) is taken in the forward and kept until backward
            kept += shape.vocab * shape.hidden * 4
    else:
        notes.append("logits in the compute dtype plus an fp32 upcast and its log-softmax" + per_chunk)
        transient, kept = logit_tokens * shape.vocab * (act_bytes + 8), 0.0
    if recomputed_now:
        # the loss's logits live before the layers' backward starts, a recomputed layer only inside it:
        # the two never coexist, so the peak takes the larger (the activations row holds the layer)
        notes.append("loss logits and a recomputed layer are alive in different phases: the larger of the two counts")
        transient = max(0.0, transient - recomputed_now)
    return [(f"activations ({mode}, {tokens} tokens/micro-batch)", act),
            (f"logits + loss ({logit_tokens} tokens at once)", kept + transient)]


def _deepspeed_buffers(cfg, hf_config, shape: ModelShape, trainable: int, n: int, on_gpu: bool, mixed: bool):
    """DeepSpeed's own buffers, sized from the resolved DeepSpeed config (DeepSpeed 0.19 source).

    Returns (rows held through backward, rows only inside ``step()``, ZeRO-3 layers gathered at once
    or None, notes). Stages 1-2 (``stage_1_and_2.py``): ``setup_buckets`` allocates one
    ``reduce_bucket_size`` gradient bucket per backward, two under ``overlap_comm``, freed when the
    backward ends; ``step()`` flattens the gradient partition (a copy) and casts it to fp32 before
    the optimizer runs. Stage 3 (``stage3.py``): one bucket allocated at init and kept; ``step()``
    does the same flatten + cast per ``sub_group_size`` elements; layers stay gathered for the
    prefetch window and while their next use is within ``stage3_max_reuse_distance``.
    """
    from parallel.zero import resolved_deepspeed_config

    ds = resolved_deepspeed_config(cfg, n, on_gpu, hf_config)
    zero = ds["zero_optimization"]
    stage = int(zero["stage"])
    grad_bytes = 2 if ds["bf16"]["enabled"] else 4
    bucket = int(zero.get("reduce_bucket_size", 5e8))
    partition = trainable / n
    offload = "offload_optimizer" in zero
    rows, step_rows = [], []
    if stage < 3:
        buffers = 2 if zero.get("overlap_comm", False) else 1
        rows.append((f"DeepSpeed gradient buckets ({buffers} x {bucket / 1e6:.1f}M elements)", buffers * bucket * grad_bytes))
    else:
        rows.append((f"DeepSpeed stage-3 gradient bucket ({bucket / 1e6:.1f}M elements, kept)", bucket * grad_bytes))
        partition = min(partition, int(zero.get("sub_group_size", 1e9)))
    if not offload:
        # flatten() copies the partition in the gradient dtype; .to(fp32) copies again unless already fp32
        step_rows.append(("step: flattened gradient partition", partition * grad_bytes))
        if grad_bytes != 4:
            step_rows.append(("step: its fp32 cast for the optimizer", partition * 4))
    notes = [f"DeepSpeed buffers from the resolved config: reduce_bucket_size={bucket:,}"
             + (", overlap_comm" if zero.get("overlap_comm") else "") + ("; the optimizer step runs on the host" if offload else "")]
    layers = None
    if stage == 3:
        layer = shape.layer_params
        prefetched = -(-int(zero.get("stage3_prefetch_bucket_size", 5e7)) // layer)
        # layers whose backward use is within the reuse distance stay gathered from forward to backward:
        # between them lie the head and two passes (recompute + backward) over every later layer
        reuse = int(zero.get("stage3_max_reuse_distance", 1e9))
        retained = max(0, (reuse - shape.root_params) // (2 * layer))
        live_cap = max(1, int(zero.get("stage3_max_live_parameters", 1e9)) // layer)
        layers = min(shape.layers, 1 + min(prefetched, live_cap) + retained)
        notes.append(f"ZeRO-3: {layers} layers gathered at once (current + {min(prefetched, live_cap)} prefetched"
                     + (f" + {retained} kept from forward to backward by stage3_max_reuse_distance" if retained else "") + ")")
    return rows, step_rows, layers, notes
