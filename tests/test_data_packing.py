"""trainer.data packing: packed loss == unpacked loss, BFD bins, loader sharding and exact resume."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from trainer.data import IGNORE, Example, PackedLoader, collate, iter_eval_batches, model_inputs, pack_bfd


def numbered_examples(n: int, seed: int = 0, max_len: int = 40) -> list[Example]:
    """Example i is made of token i+1 only, so any batch says which examples it holds."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(2, max_len)
        out.append(Example([i + 1] * length, [IGNORE] + [i + 1] * (length - 1)))
    return out


def documents_in(batch) -> list[int]:
    """Example indices in a batch, read from the first token of each document (position 0, not padding)."""
    starts = (batch["position_ids"] == 0) & (batch["input_ids"] != 0)
    return [int(t) - 1 for t in batch["input_ids"][starts]]


# --------------------------------------------------------------------------------------------
# packed == unpacked on real models
# --------------------------------------------------------------------------------------------
def per_token_losses(model, batch) -> torch.Tensor:
    """Per-token CE at the trained positions (HF shift: logits at t predict labels at t + 1), in row order."""
    logits = model(**model_inputs(batch)).logits.float()
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return losses[labels.flatten() != IGNORE]


@pytest.fixture(scope="module")
def chat_examples(smollm2_dir):
    from transformers import AutoTokenizer

    from trainer.config import Config, DataConfig, TrainConfig
    from trainer.data import build_examples

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = Config(data=DataConfig(source="chat", num_samples=12, val_fraction=0.0), train=TrainConfig(seq_len=256))
    return tok, build_examples(cfg, tok)[0]


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa")])
def test_packed_loss_equals_unpacked_loss(tiny_model_factory, chat_examples, arch, attn):
    from transformers import AutoModelForCausalLM

    tok, examples = chat_examples
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch), dtype=torch.float32, attn_implementation=attn).eval()
    assert model.config.use_cache  # the default that silently disables packed masks unless model_inputs() turns it off

    packed_batch = next(PackedLoader(examples, micro_batch_size=2, seq_len=256, packing=True, shuffle=False))
    docs = [examples[i] for i in _document_order(packed_batch, examples)]  # the packed documents, in row order
    assert len(docs) >= 5, "the test needs rows that really hold several documents"
    with torch.no_grad():
        packed = per_token_losses(model, packed_batch)
        unpacked = torch.cat([per_token_losses(model, collate([[d]], tok.pad_token_id)) for d in docs])
    assert packed.shape == unpacked.shape and packed.numel() == sum(d.num_trained for d in docs)
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.sum(), unpacked.sum(), rtol=1e-6, atol=1e-4)


def _document_order(batch, examples) -> list[int]:
    """Which example each packed document is (matched by tokens; the chat rows are all distinct)."""
    by_tokens = {tuple(e.input_ids): i for i, e in enumerate(examples)}
    order = []
    for r in range(batch["input_ids"].shape[0]):
        starts = torch.nonzero(batch["position_ids"][r] == 0).flatten().tolist() + [batch["input_ids"].shape[1]]
        for s, e in zip(starts, starts[1:]):
            key = tuple(batch["input_ids"][r, s:e].tolist())
            if key in by_tokens:  # padding matches nothing
                order.append(by_tokens[key])
    return order


# --------------------------------------------------------------------------------------------
# packing and batches
# --------------------------------------------------------------------------------------------
def test_bfd_bins_hold_every_item_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = pack_bfd(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 128) * 1.05  # within 5% of the lower bound
    assert pack_bfd([60, 50, 40, 30, 20], 100) == [[0, 2], [1, 3, 4]]  # each item into the fullest bin it fits


def test_batches_restart_positions_per_document_and_never_train_padding():
    examples = numbered_examples(30)
    batch = next(PackedLoader(examples, micro_batch_size=4, seq_len=64, seed=1))
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert ids.shape == labels.shape == pos.shape and ids.dtype == torch.long and ids.shape[1] <= 64
    for r in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if pos[r, t] != 0:  # inside a document (or padding) positions count up and the token stays the same
                assert pos[r, t] == pos[r, t - 1] + 1 and ids[r, t] == ids[r, t - 1]
        assert torch.all(labels[r][ids[r] == 0] == IGNORE)  # padding (pad_id 0)
        assert torch.all(labels[r][pos[r] == 0] == IGNORE)  # no document's first token is predicted by its neighbour


def test_unpacked_loader_gives_one_example_per_row():
    examples = numbered_examples(10)
    batch = next(PackedLoader(examples, micro_batch_size=3, seq_len=64, packing=False, shuffle=False))
    assert documents_in(batch) == [0, 1, 2] and batch["input_ids"].shape[1] == max(len(e) for e in examples[:3])


def test_loader_resumes_exactly_even_across_epochs():
    examples = numbered_examples(40)
    a = PackedLoader(examples, micro_batch_size=3, seq_len=64, seed=7)
    for _ in range(11):  # several epochs of ~10 rows: the state lands mid-epoch
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(9)]
    b = PackedLoader(examples, micro_batch_size=3, seq_len=64, seed=7)
    b.load_state_dict(state)
    for want, got in zip(expected, (next(b) for _ in range(9))):
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(want[key], got[key])
    assert state["epoch"] >= 1


def test_epochs_are_reshuffled_deterministically_from_the_seed():
    examples = numbered_examples(40)

    def epochs(seed):
        loader = PackedLoader(examples, micro_batch_size=1, seq_len=64, seed=seed)
        return [sum((documents_in(next(loader)) for _ in range(loader.rows_per_epoch)), []) for _ in range(2)]

    first, second = epochs(3)
    assert sorted(first) == sorted(second) == list(range(40)) and first != second
    assert epochs(3) == [first, second] and epochs(4)[0] != first


def test_ranks_get_disjoint_equal_shards():
    examples = numbered_examples(60)
    loaders = [PackedLoader(examples, micro_batch_size=1, seq_len=64, seed=5, rank=r, world_size=3) for r in range(3)]
    rows = {loader.rows_per_epoch for loader in loaders}
    assert len(rows) == 1  # equal shards: no rank waits for another at a collective
    shards = [{d for _ in range(loader.rows_per_epoch) for d in documents_in(next(loader))} for loader in loaders]
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    assert len(set().union(*shards)) >= 60 - 2 * 3  # only the last len(rows) % world_size rows (<= 2, ~3 docs each) sit out


def test_load_state_refuses_a_different_dataset():
    state = PackedLoader(numbered_examples(20), 2, 64).state_dict()
    with pytest.raises(ValueError, match="num_examples: 20 -> 21"):
        PackedLoader(numbered_examples(21), 2, 64).load_state_dict(state)


def test_eval_batches_cover_every_example_once_across_ranks():
    examples = numbered_examples(25)
    seen = [d for rank in range(2) for b in iter_eval_batches(examples, 3, 64, rank=rank, world_size=2) for d in documents_in(b)]
    assert sorted(seen) == list(range(25))


def test_static_shape_pads_every_batch_to_seq_len_with_the_same_documents():
    """train.compile: one micro-batch width (seq_len) so compiled layers never recompile; the extra
    columns are padding that trains nothing, and the documents are the ones the dynamic loader gives."""
    examples = numbered_examples(12, max_len=60)  # few, long documents: rows rarely fill exactly
    dynamic = PackedLoader(examples, micro_batch_size=3, seq_len=64, seed=2)
    static = PackedLoader(examples, micro_batch_size=3, seq_len=64, seed=2, static_shape=True)
    widths = set()
    for _ in range(8):
        d, s = next(dynamic), next(static)
        widths.add(d["input_ids"].shape[1])
        assert s["input_ids"].shape == s["labels"].shape == s["position_ids"].shape == (3, 64)
        w = d["input_ids"].shape[1]
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(s[key][:, :w], d[key])
        assert torch.all(s["labels"][:, w:] == IGNORE)
    assert len(widths) > 1  # the dynamic loader really does vary (what made compiled runs recompile)
    assert static.fill < dynamic.fill  # padding to seq_len is counted as padding
