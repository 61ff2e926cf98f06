"""Owns the model and the KV cache on one device: builds step inputs, runs the forward, returns logits.

The KV cache is one tensor ``[2, layers, blocks, block_size, kv_heads, head_dim]``; each attention
layer gets its views. On CPU its size is ``engine.num_blocks``; on GPU it takes what
``gpu_memory_utilization`` leaves after the weights and a full-budget warm-up step. Decode steps on
GPU replay CUDA graphs captured for batch-size buckets (padded with slot -1 / context length 0);
a graph covers the whole decoder stack, the LM head and the greedy argmax, and its inputs arrive in
one host-to-device copy from a pinned staging buffer, so a decode step costs one copy, one replay and
one device-to-host read of the tokens. ``launch_ahead`` queues the next step's replay while the host
still finishes the current one (the engine calls it once the tokens are known), so the host's
scheduling and bookkeeping overlap the GPU's work instead of leaving it idle. Each graph ends by moving
its inputs on to the next position (engine/kernels/decode_advance.py), so ``decode_steps`` replays
the same graph k times back to back for k greedy tokens and one read.

On CUDA, projections at <= 8 rows run a Triton GEMV (``engine.gemv``) whose config per projection
group was timed against cuBLAS at start-up (engine/kernels/gemv_tuning.py).
"""
from __future__ import annotations

import importlib

import torch

from engine.config import EngineConfig
from engine.context import Context, set_context
from engine.layers import compile_fused_ops
from engine.loader import load_checkpoint, merge_lora_adapter
from engine.lora import LoRAManager
from engine.model import CausalLM, ModelArgs
from engine.scheduler import Batch

# ModelRunner.set_kernels' process-wide switches: keyword -> (module, setter taking a bool)
KERNEL_SETTERS = {"pdl": ("engine.kernels", "set_pdl"),
                  "merge_in_kernel": ("engine.kernels.paged_attention", "set_merge_in_kernel"),
                  "early_table": ("engine.kernels.paged_attention", "set_early_table"),
                  "early_epilogue": ("engine.kernels.gemv", "set_early_epilogue"),
                  "evict_first": ("engine.kernels.gemv", "set_evict_first")}


class ModelRunner:
    def __init__(self, model_path: str, config: EngineConfig, dtype: torch.dtype, device: torch.device, max_model_len: int):
        self.config, self.dtype, self.device, self.max_model_len = config, dtype, device, max_model_len
        self.block_size = config.block_size
        self.args = ModelArgs.from_hf_dir(model_path)
        backend = config.attention_backend
        self.backend = ("triton" if device.type == "cuda" else "torch") if backend == "auto" else backend
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = CausalLM(self.args, max_positions=max_model_len)
        finally:
            torch.set_default_dtype(previous)
        load_checkpoint(self.model, model_path)
        if config.adapter:
            merge_lora_adapter(self.model, config.adapter)
        self.model.eval()
        if device.type == "cuda":
            from engine.kernels import set_pdl

            set_pdl(config.pdl)  # process-wide, read at every launch: set before tuning and capture
            compile_fused_ops(self.model)  # enforce_eager too: it differs from the graph path by the graphs alone
        # the decode attention's split-merge counters (zero between launches): this engine's own, so two
        # engines on one device never share them; splits > 1 only while batch x kv_heads < 128 programs
        self.split_counters = (torch.zeros(128, dtype=torch.int32, device=device) if self.backend == "triton" else None)
        self.gemv_tuning: list[dict] = []  # one row per (projection group, batch bucket): the timed choice
        self._gemv_plans: dict = {}
        if device.type == "cuda" and config.gemv:
            self._plan_gemv()
        # adapter slots exist before the KV budget is measured and before graphs capture the LoRA kernels
        self.lora = LoRAManager(self.model, config.max_loras, config.max_lora_rank, config.max_cpu_loras) if config.enable_lora else None
        self.num_blocks = config.num_blocks if device.type != "cuda" else self._gpu_num_blocks()
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self._allocate_kv_cache()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        max_bs = min(config.max_num_seqs, 512)
        self.graph_buckets = sorted({b for b in [1, 2, 4, 8, *range(16, max_bs + 1, 16), max_bs] if b <= max_bs})
        self._graph_logits: tuple[torch.Tensor, torch.Tensor] | None = None  # (hidden, logits) of the last replay
        # what is queued ahead on the GPU: (decode key, steps, first history row) — one step by launch_ahead,
        # or a whole round by decode_steps(next_steps=...)
        self._ahead: tuple | None = None
        self.max_decode_steps = max(config.decode_steps, 1)  # longest multi-step round
        if device.type == "cuda" and not config.enforce_eager and self.backend == "triton":
            self._capture_decode_graphs()

    # ---------------------------------------------------------------- GEMV
    @torch.inference_mode()  # as in the steps: torch.compile'd candidates are not recompiled later
    def _plan_gemv(self) -> None:
        from engine.kernels.gemv_tuning import plan

        self.gemv_tuning = plan(self.model.projections(), self.device)
        self._gemv_plans = {p.linear: p.linear.gemv for p in self.model.projections()}

    def set_kernels(self, gemv: bool | None = None, **switches: bool | None) -> None:
        """Switch the Triton GEMV and/or the process-wide kernel switches of ``KERNEL_SETTERS`` (PDL, the
        decode attention's in-kernel split merge and early block-id loads, the GEMV's early epilogue and
        evict-first weight loads) on or off, None leaving one as it is (benchmarks A/B them in one
        process); recaptures the graphs, which keep the kernels and launch attributes they were captured with."""
        if self.device.type != "cuda":
            raise RuntimeError("the Triton GEMV, PDL and the split merge run on CUDA only")
        unknown = switches.keys() - KERNEL_SETTERS.keys()
        if unknown:
            raise TypeError(f"set_kernels: unknown switch {', '.join(sorted(unknown))}; known: gemv, "
                            + ", ".join(KERNEL_SETTERS))
        for name, enabled in switches.items():
            if enabled is not None:
                module, setter = KERNEL_SETTERS[name]
                getattr(importlib.import_module(module), setter)(enabled)  # imported here: Triton is CUDA-only
        if gemv and not self._gemv_plans:
            self._plan_gemv()
        if gemv is not None:
            for linear, gemv_plan in self._gemv_plans.items():
                linear.gemv = gemv_plan if gemv else None
        if self.graphs:
            self.graphs.clear()
            self._ahead = None
            torch.cuda.synchronize()
            self._capture_decode_graphs()

    # ---------------------------------------------------------------- KV cache
    def _block_bytes(self) -> int:
        a = self.args
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    @torch.inference_mode()
    def _gpu_num_blocks(self) -> int:
        """Blocks that fit in ``gpu_memory_utilization`` after the peak of a full-budget warm-up step."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._allocate_kv_cache(num_blocks=1)
        n_tokens = self.config.max_num_batched_tokens
        seq_len = min(self.max_model_len, n_tokens)
        lens = [seq_len] * (n_tokens // seq_len) + ([n_tokens % seq_len] if n_tokens % seq_len else [])
        ids = torch.zeros(n_tokens, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        # every block table entry points at the one scratch block: right memory footprint, values unused
        ctx = self._context([-1] * n_tokens, [[0] * -(-n // self.block_size) for n in lens], lens, lens, is_decode=False)
        if self.lora is not None:  # every token through an adapter: the LoRA path's activations count too
            self.lora.step.slots = ctx.adapter_ids = torch.zeros(n_tokens, dtype=torch.long, device=self.device)
            self.lora.step.groups = [(0, torch.arange(n_tokens, device=self.device))]
        set_context(ctx)
        try:
            hidden = self.model(ids, positions)
        finally:
            set_context(None)
            if self.lora is not None:
                self.lora.step.slots = self.lora.step.groups = None
        rows = min(self.config.max_num_seqs, n_tokens)
        self.model.compute_logits(hidden[:rows]).softmax(-1)  # the sampler's working set
        del hidden
        torch.cuda.empty_cache()  # so memory the allocator merely caches is not counted as used elsewhere
        free, total = torch.cuda.mem_get_info()
        used_elsewhere = total - free - torch.cuda.memory_allocated()  # other processes, CUDA context, NCCL
        # max_memory_allocated counts every live tensor of this process: our weights and warm-up peak,
        # but also anything the caller still holds (a previous engine's KV cache, a trainer's model)
        peak = torch.cuda.max_memory_allocated()
        budget = total * self.config.gpu_memory_utilization - used_elsewhere - peak
        num_blocks = int(budget // self._block_bytes())
        if num_blocks <= 0:
            gib = 2 ** 30
            raise RuntimeError(
                f"no GPU memory left for the KV cache at engine.gpu_memory_utilization={self.config.gpu_memory_utilization}: "
                f"{total / gib:.1f} GiB total, {used_elsewhere / gib:.1f} GiB used outside this process's allocator, "
                f"{peak / gib:.1f} GiB peak of this process's tensors (weights, warm-up step, and any tensors still alive, "
                "e.g. an earlier engine not yet freed); raise gpu_memory_utilization, lower max_num_batched_tokens, "
                "or free other GPU tensors first")
        return num_blocks

    def _allocate_kv_cache(self, num_blocks: int | None = None) -> None:
        a = self.args
        n = num_blocks or self.num_blocks
        self.kv_cache = None  # release the old one first
        self.kv_cache = torch.zeros(2, a.num_layers, n, self.block_size, a.num_kv_heads, a.head_dim, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    # ---------------------------------------------------------------- step inputs
    def _decode_splits(self, num_seqs: int) -> int | None:
        """The decode kernel's context splits for a batch: those of its graph bucket, so that eager and
        replayed steps compute the same sums in the same order (bit-equal results)."""
        if self.backend != "triton":
            return None
        from engine.kernels.paged_attention import decode_splits

        return decode_splits(self._bucket(num_seqs), self.args.num_kv_heads, self.max_blocks_per_seq * self.block_size)

    def _bucket(self, num_seqs: int) -> int:
        """The smallest graph bucket holding ``num_seqs`` rows (``num_seqs`` itself past the largest)."""
        return next((b for b in self.graph_buckets if b >= num_seqs), num_seqs)

    def _slot(self, block_table: list[int], position: int) -> int:
        """The KV-cache slot of a sequence's token at ``position``."""
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _context(self, slots: list[int], block_tables: list[list[int]], seqlens_q: list[int], context_lens: list[int],
                 is_decode: bool) -> Context:
        dev = self.device
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        cu = torch.zeros(len(seqlens_q) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seqlens_q).cumsum(0)
        return Context(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            block_tables=tables.to(dev, non_blocking=True),
            context_lens=torch.tensor(context_lens, dtype=torch.int32).to(dev, non_blocking=True),
            cu_seqlens_q=cu.to(dev, non_blocking=True),
            max_seqlen_q=max(seqlens_q),
            is_decode=is_decode,
            backend=self.backend,
            seqlens_q=seqlens_q,
            context_lens_list=context_lens,
            decode_splits=self._decode_splits(len(seqlens_q)) if is_decode else None,
            split_counters=self.split_counters,
        )

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, Context]:
        ids, positions, slots, seqlens_q, context_lens = [], [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(self._slot(table, p) for p in range(start, end))
            seqlens_q.append(n)
            context_lens.append(end)
        ctx = self._context(slots, [s.block_table for s in batch.seqs], seqlens_q, context_lens, batch.is_decode)
        if self.lora is not None:
            ctx.adapter_ids = self.lora.token_slots([s.adapter_id for s in batch.seqs], batch.num_new_tokens, self.device)
        return (torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True),
                torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True), ctx)

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Hidden states of every new token of the batch, [num_tokens, hidden]."""
        self._graph_logits = None
        ahead, self._ahead = self._ahead, None
        if ahead is not None and batch.is_decode and ahead == (_decode_key(batch.seqs), 1, 0):
            return self._graph_outputs(len(batch))  # launch_ahead already queued exactly this step
        if self.graphs and len(batch) <= self.graph_buckets[-1] and batch.is_decode:
            return self._replay(batch.seqs)
        ids, positions, ctx = self.prepare(batch)
        set_context(ctx)
        try:
            return self.model(ids, positions)
        finally:
            set_context(None)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if self._replayed(hidden, rows):
            return self.g_logits[:len(rows)]  # a replayed decode step computed them in its graph
        return self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])

    def greedy_tokens(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor | None:
        """The argmax tokens a replayed decode step computed in its graph (on device), else None."""
        return self.g_tokens[:len(rows)] if self._replayed(hidden, rows) else None

    def _replayed(self, hidden: torch.Tensor, rows: list[int]) -> bool:
        return self._graph_logits is not None and hidden is self._graph_logits[0] and rows == list(range(len(rows)))

    @torch.inference_mode()
    def launch_ahead(self, seqs: list) -> bool:
        """Queue the decode step that ``seqs`` (each with one uncomputed token) will be scheduled as,
        before the caller schedules it. ``forward`` uses it when the batch is exactly these sequences
        at these lengths and discards it otherwise (its only effect then: K/V of those sequences'
        next position, which the real step rewrites). False when it cannot be queued."""
        bs = self.block_size
        if not (self.graphs and self.config.launch_ahead and 0 < len(seqs) <= self.graph_buckets[-1]):
            return False
        if any(s.num_uncomputed_tokens != 1 for s in seqs):
            return False
        if any((len(s) - 1) // bs >= len(s.block_table) for s in seqs):  # needs a new block: the scheduler's call
            return False
        if self._ahead is not None:  # decode_steps queued the next round already
            return False
        self._replay(seqs)
        self._graph_logits = None
        self._ahead = (_decode_key(seqs), 1, 0)
        return True

    # ---------------------------------------------------------------- multi-step decode
    @torch.inference_mode()
    def decode_steps(self, seqs: list, k: int, next_steps: int = 0) -> torch.Tensor:
        """Greedy tokens [k, len(seqs)] of k decode steps of ``seqs``, each step's argmax the next one's
        input, with no host work between steps. Every sequence must have blocks for its next k
        positions (the engine allocates them). On CUDA graphs: one input copy (or the replay
        ``launch_ahead`` queued) and k replays; otherwise k eager forwards, tokens kept on the device.

        ``next_steps`` (CUDA graphs; the engine's ``pipeline_rounds``): also queue the next round of that
        many steps before reading this round's tokens — it continues on the device from this round's last
        step — so the GPU computes it while the host books this one. The sequences must have blocks
        through the position after that round. The next call takes it if it asks for exactly that round
        (the same sequences, each ``k`` tokens longer, ``next_steps`` steps); any other step discards it
        (its only effect: K/V at positions the real step rewrites or the sequence frees)."""
        if not 1 <= k <= self.max_decode_steps:
            raise ValueError(f"decode_steps: k={k} is outside [1, {self.max_decode_steps}]")
        self._graph_logits = None
        ahead, self._ahead = self._ahead, None
        n = len(seqs)
        if self.graphs and n <= self.graph_buckets[-1]:
            bucket = self._bucket(n)
            key = _decode_key(seqs)
            if ahead is not None and ahead[0] == _lengths(key) and ahead[1] == k:
                first = ahead[2]  # the whole round is queued already
            else:
                if ahead != (key, 1, 0):  # else launch_ahead queued step 1
                    self._replay(seqs)
                for _ in range(k - 1):  # each replay starts from the inputs the previous one advanced
                    self.graphs[bucket].replay()
                first = 0
            self._copy_history(first, k)  # queued between this round and the next: the wait below is this round's
            if 1 <= next_steps <= self.max_decode_steps:
                self._queue_round(seqs, bucket, next_steps)
                # matched on ids and lengths only: the tables grow again (for the round after it) before the
                # next call, and the round's own blocks were on the device when it was queued
                self._ahead = (tuple((i, length + k) for i, length in _lengths(key)), next_steps,
                               (first + k) % self.g_hist.shape[0])
            self.history_read.synchronize()
            return self.h_hist[:k, :n].clone()
        ids = torch.tensor([s.token_ids[-1] for s in seqs], dtype=torch.long, device=self.device)
        adapters = [s.adapter_id for s in seqs]
        tokens = []
        for step in range(k):
            positions = [len(s) - 1 + step for s in seqs]
            slots = [self._slot(s.block_table, p) for s, p in zip(seqs, positions)]
            ctx = self._context(slots, [s.block_table for s in seqs], [1] * n, [p + 1 for p in positions], True)
            if self.lora is not None:
                ctx.adapter_ids = self.lora.token_slots(adapters, [1] * n, self.device)
            set_context(ctx)
            try:
                hidden = self.model(ids, torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True))
            finally:
                set_context(None)
            ids = self.model.compute_logits(hidden).argmax(-1)
            tokens.append(ids)
        return torch.stack(tokens)

    @torch.inference_mode()
    def dry_replay_graph(self, batch_size: int, context_len: int) -> torch.cuda.CUDAGraph:
        """For benchmarks: set the graph inputs to ``batch_size`` rows that attend over ``context_len``
        cached tokens (block 0 repeated) but store nothing and never advance (slot -1), and return the
        bucket's graph, so timing loops can replay it any number of times without touching the cache."""
        self._ahead = None
        bucket = self._bucket(batch_size)
        vec, tables = self.h_vec, self.h_tables
        self.copy_done.synchronize()
        vec[:, :bucket] = 0
        vec[1, :batch_size], vec[2, :bucket], vec[3, :bucket] = context_len - 1, -1, -1
        vec[4, :batch_size] = context_len
        tables[:bucket] = 0
        self._upload(bucket)
        return self.graphs[bucket]

    def _upload(self, bucket: int) -> None:
        """Copy the staged inputs of ``bucket`` rows to the graphs' buffer (one async H2D copy; the
        event lets the host know when it may rewrite the staging buffer)."""
        used = _INPUT_ROWS * self.h_tables.shape[0] + bucket * self.h_tables.shape[1]
        self.g_buf[:used].copy_(self.h_buf[:used], non_blocking=True)
        self.copy_done.record()

    # ---------------------------------------------------------------- CUDA graphs
    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        from engine.kernels.argmax import Argmax
        from engine.kernels.decode_advance import advance_decode_inputs

        max_bs, width = self.graph_buckets[-1], self.max_blocks_per_seq
        # One int64 buffer holds every graph input (ids | positions | slots | adapter slots | context
        # lengths | step counter (first entry of its row) | block tables), mirrored by a pinned host
        # buffer: a step is a single H2D copy.
        rows = _INPUT_ROWS * max_bs
        self.g_buf = torch.zeros(rows + max_bs * width, dtype=torch.long, device=self.device)
        self.h_buf = torch.zeros_like(self.g_buf, device="cpu").pin_memory()
        self.h_np = self.h_buf.numpy()
        self.h_vec = self.h_np[:rows].reshape(_INPUT_ROWS, max_bs)
        self.h_tables = self.h_np[rows:].reshape(max_bs, width)
        ids, pos, slots, adapter, lens, counter = self.g_buf[:rows].view(_INPUT_ROWS, max_bs)
        counter = counter[:1]
        tables = self.g_buf[rows:].view(max_bs, width)
        self.g_out = torch.zeros(max_bs, self.args.hidden_size, dtype=self.dtype, device=self.device)
        self.g_logits = torch.zeros(max_bs, self.args.vocab_size, dtype=torch.float32, device=self.device)
        self.g_tokens = torch.zeros(max_bs, dtype=torch.long, device=self.device)
        # two rounds deep: a round queued ahead (decode_steps' next_steps) writes rows the host is not reading
        self.g_hist = torch.zeros(2 * self.max_decode_steps, max_bs, dtype=torch.long, device=self.device)
        self.h_hist = torch.zeros_like(self.g_hist, device="cpu").pin_memory()
        self.history_read = torch.cuda.Event()
        # the graphs write into these buffers on every replay: they must live as long as the graphs (a local
        # would return them to the allocator, which hands them to the next tensor — the graphs then clobber it)
        self._argmax = argmax = Argmax(max_bs, self.args.vocab_size, self.device)
        self.copy_done = torch.cuda.Event()  # the last staging copy: the host waits on it before rewriting h_buf
        slots.fill_(-1)
        adapter.fill_(-1)
        pool = None
        for b in reversed(self.graph_buckets):  # largest first: smaller graphs reuse its memory pool
            ctx = Context(slots[:b], tables[:b], lens[:b], torch.arange(b + 1, dtype=torch.int32, device=self.device),
                          1, True, self.backend, adapter_ids=adapter[:b] if self.lora is not None else None,
                          decode_splits=self._decode_splits(b), split_counters=self.split_counters)
            set_context(ctx)

            def step():
                self.g_out[:b] = self.model(ids[:b], pos[:b])
                self.g_logits[:b] = self.model.compute_logits(self.g_out[:b])
                argmax(self.g_logits[:b], self.g_tokens[:b])  # greedy on device: the host reads only tokens
                advance_decode_inputs(ids[:b], pos[:b], slots[:b], lens[:b], tables[:b], self.g_tokens[:b], self.g_hist,
                                      counter, self.block_size)

            step()  # warm-up (Triton compiles); padding rows (slot -1) do not advance
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                step()
            pool = graph.pool() if pool is None else pool
            self.graphs[b] = graph
            set_context(None)
        torch.cuda.synchronize()

    def _queue_round(self, seqs: list, bucket: int, steps: int) -> None:
        """Queue ``steps`` replays that continue from the inputs the last replay advanced, after one
        copy of the sequences' block tables (grown for the new round since the last upload)."""
        width = self.h_tables.shape[1]
        self.copy_done.synchronize()  # the previous upload may still be reading the staging buffer
        for i, seq in enumerate(seqs):
            self.h_tables[i, :len(seq.block_table)] = seq.block_table
        start = _INPUT_ROWS * self.h_vec.shape[1]
        self.g_buf[start:start + len(seqs) * width].copy_(self.h_buf[start:start + len(seqs) * width], non_blocking=True)
        self.copy_done.record()
        for _ in range(steps):
            self.graphs[bucket].replay()

    def _copy_history(self, first: int, k: int) -> None:
        """Queue the copy of history rows ``first .. first + k`` (mod its depth) to pinned memory, in stream
        order after the replays queued so far; ``history_read`` marks its end, so a round queued after the
        copy does not delay the host's wait (that round writes other rows)."""
        depth = self.g_hist.shape[0]
        first %= depth
        head = min(k, depth - first)  # rows before the ring wraps around
        self.h_hist[:head].copy_(self.g_hist[first:first + head], non_blocking=True)  # whole rows: contiguous copies
        if head < k:
            self.h_hist[head:k].copy_(self.g_hist[:k - head], non_blocking=True)
        self.history_read.record()

    def _replay(self, seqs: list) -> torch.Tensor:
        """A decode step of ``seqs`` through its bucket's graph."""
        n = len(seqs)
        bucket = self._bucket(n)
        vec, tables = self.h_vec, self.h_tables
        ids, pos, slots, adapter, lens, counter = vec
        self.copy_done.synchronize()  # a launch_ahead copy may still be reading the staging buffer
        for i, seq in enumerate(seqs):
            p = len(seq) - 1
            table = seq.block_table
            ids[i], pos[i], lens[i] = seq.token_ids[p], p, p + 1
            slots[i] = self._slot(table, p)
            tables[i, :len(table)] = table
            if self.lora is not None:
                adapter[i] = self.lora.slot_by_id[seq.adapter_id] if seq.adapter_id else -1
        slots[n:bucket], lens[n:bucket], adapter[n:bucket] = -1, 0, -1  # padding rows: no store, no attention
        counter[0] = 0  # this replay's tokens go to history row 0
        self._upload(bucket)
        self.graphs[bucket].replay()
        return self._graph_outputs(n)

    def _graph_outputs(self, n: int) -> torch.Tensor:
        hidden = self.g_out[:n]
        self._graph_logits = (hidden, self.g_logits)
        return hidden


_INPUT_ROWS = 6  # per-row graph inputs: ids, positions, slots, adapter slots, context lengths, the step counter


def _lengths(key: tuple) -> tuple:
    """A decode key without the block-table lengths: (sequence id, length) per row."""
    return tuple(entry[:2] for entry in key)


def _decode_key(seqs: list) -> tuple:
    """What a queued decode replay was computed for: these sequences, in this order, at these lengths
    (and block tables, which only the scheduler changes and only by growing them)."""
    return tuple((s.seq_id, len(s), len(s.block_table)) for s in seqs)
