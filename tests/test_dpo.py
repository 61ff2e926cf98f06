"""DPO: data validation, packing, reference options, and preference accuracy rising on built-in pairs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignment.pairs import PairEncoder, PairStats, encode_pairs
from alignment.sequences import Document, rows_from_documents, sum_by_document, token_logprobs
from trainer.config import ConfigError, load_config


def train(cfg):
    """The real loop (trainer/trainer.py) with this config; returns the trainer and its logged history."""
    from trainer.trainer import Trainer

    trainer = Trainer(cfg)
    return trainer, trainer.train()


def _cfg(model_dir: str, tmp_path: Path, *overrides: str):
    return load_config([f"model.path={model_dir}", "train.method=dpo", "device=cpu", "precision=fp32", "train.seq_len=64",
                        "dpo.max_prompt_len=48", f"output_dir={tmp_path}", "engine.num_blocks=128", "train.scheduler=constant",
                        "checkpoint.save_final=false", *overrides])


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.mark.parametrize("row,message", [
    ({"prompt": "2+2?", "chosen": "4"}, "row 1: missing 'rejected'"),
    ({"prompt": "2+2?", "chosen": "4", "rejected": "4"}, "row 1: chosen and rejected are identical"),
    ({"prompt": "word " * 80, "chosen": "a", "rejected": "b"}, "row 1: prompt is 8"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
     "row 1: the prompt's last message is an assistant turn"),
])
def test_bad_rows_are_named(tokenizer, row, message):
    rows = [{"prompt": "1+1?", "chosen": "2", "rejected": "3"}, row]
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        encode_pairs(rows, PairEncoder(tokenizer, 48, 64), "pairs.jsonl", "raise")
    pairs, stats = encode_pairs(rows, PairEncoder(tokenizer, 48, 64), "pairs.jsonl", "skip")
    assert len(pairs) == 1 and sum(stats.skipped.values()) == 1


def test_chat_pairs_train_the_answer_up_to_the_stop_token(tokenizer):
    row = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "chosen": "4", "rejected": [{"role": "assistant", "content": "5"}]}
    pair = PairEncoder(tokenizer, 48, 64).encode(row, PairStats())
    assert tokenizer.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(pair.chosen_ids) == "4<|im_end|>" and tokenizer.decode(pair.rejected_ids) == "5<|im_end|>"


def test_long_completions_are_truncated_to_seq_len(tokenizer):
    pair = PairEncoder(tokenizer, 48, 64).encode({"prompt": "Say:", "chosen": " yes" * 100, "rejected": " no"}, stats := PairStats())
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 64 and stats.truncated == 1


def test_packed_rows_score_each_document_as_if_alone(tiny_llama_dir):
    """Packing several chosen/rejected documents into one row changes no document's log-prob."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    docs = [Document(torch.randint(5, 500, (int(p),), generator=g).tolist(), torch.randint(5, 500, (int(c),), generator=g).tolist())
            for p, c in [(7, 3), (4, 9), (12, 2), (5, 5), (3, 11)]]
    packed = rows_from_documents(docs, seq_len=40, packing=True)
    alone = rows_from_documents(docs, seq_len=40, packing=False)
    assert packed["input_ids"].shape[0] < alone["input_ids"].shape[0]  # it did pack
    with torch.no_grad():
        a = sum_by_document(token_logprobs(model, packed)[0], packed["doc_index"], len(docs))
        b = sum_by_document(token_logprobs(model, alone)[0], alone["doc_index"], len(docs))
    assert torch.allclose(a, b, atol=1e-4)


def test_static_shape_pads_rows_and_width_without_changing_any_document(tiny_llama_dir):
    """train.compile's static batches: [rows, width] exactly, padding rows score nothing, every document's
    log-prob unchanged; a batch that cannot fit is an error naming the shape."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    docs = [Document(torch.randint(5, 500, (int(p),), generator=g).tolist(), torch.randint(5, 500, (int(c),), generator=g).tolist())
            for p, c in [(7, 3), (4, 9), (12, 2), (5, 5)]]
    packed = rows_from_documents(docs, seq_len=40, packing=True)
    static = rows_from_documents(docs, seq_len=40, packing=True, static_shape=(4, 40))
    assert static["input_ids"].shape == (4, 40) and packed["input_ids"].shape[0] < 4
    assert (static["doc_index"][packed["input_ids"].shape[0]:] == -1).all()  # padding rows: nothing scored
    with torch.no_grad():
        a = sum_by_document(token_logprobs(model, packed)[0], packed["doc_index"], len(docs))
        b = sum_by_document(token_logprobs(model, static)[0], static["doc_index"], len(docs))
    assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match=r"does not fit the static shape \(1, 40\)"):
        rows_from_documents(docs, seq_len=40, packing=False, static_shape=(1, 40))


# ---------------------------------------------------------------------------------------------
# Method
# ---------------------------------------------------------------------------------------------
def _write_pairs(path: Path, n: int = 24) -> str:
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "chosen": str(i + 1), "rejected": f"no idea {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_reference_options_agree(tiny_llama_dir, tmp_path):
    """copy, lora_disabled and precomputed are three ways to the same reference log-probs."""
    data = _write_pairs(tmp_path / "pairs.jsonl")
    losses = {}
    for kind in ("lora_disabled", "copy", "precomputed"):
        cfg = _cfg(tiny_llama_dir, tmp_path / kind, f"data.source={data}", f"dpo.reference={kind}", "train.micro_batch_size=4",
                   "train.lr=1e-2", "train.max_steps=2")
        trainer, _ = train(cfg)  # the policy moves away from the reference
        with torch.no_grad():
            losses[kind] = float(trainer.method.loss(trainer.model, trainer.method.next_batch()).loss_sum)
    assert losses["copy"] == pytest.approx(losses["lora_disabled"], abs=1e-4)
    assert losses["precomputed"] == pytest.approx(losses["lora_disabled"], abs=1e-4)
    assert (tmp_path / "precomputed" / "ref_logps.rank0.pt").is_file()


def test_preference_accuracy_rises_on_builtin_pairs(tiny_llama_dir, tmp_path):
    """arithmetic_pairs from the model's own samples (a random model: reference answers are chosen);
    held-out preference accuracy, logged at step 0 before training, climbs and the run ends with a curve."""
    cfg = _cfg(tiny_llama_dir, tmp_path, "data.source=arithmetic_pairs", "data.num_samples=96", "data.val_fraction=0.25",
               "dpo.pair_samples=2", "dpo.pair_max_tokens=6", "train.micro_batch_size=8", "train.lr=3e-3", "dpo.beta=0.5",
               "train.max_steps=12")
    trainer, history = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert rows and all(set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"] for r in rows)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[0] == {"step": 0, **trainer.method.initial_val}  # validated before training
    before, after = records[0]["val_accuracy"], history[-1]["val_accuracy"]
    assert after >= before + 0.3, (before, after)
    train_acc = [r["accuracy"] for r in history if "accuracy" in r]
    assert sum(train_acc[-3:]) / 3 > sum(train_acc[:3]) / 3
    assert (tmp_path / "preference.png").stat().st_size > 0


@pytest.mark.parametrize("packing", [True, False])
def test_compiled_runs_get_one_batch_shape(packing):
    """Under train.compile every DPO micro-batch is [2 x micro_batch_size, seq_len], whatever its pairs' lengths."""
    from alignment.dpo import DPOMethod
    from alignment.pairs import Pair
    from trainer.config import build_config

    cfg = build_config({"train": {"method": "dpo", "compile": True, "micro_batch_size": 3, "seq_len": 64},
                        "data": {"packing": packing}})
    method = DPOMethod(cfg)
    method.pad_id = 0
    pairs = [Pair(list(range(5, 5 + p)), list(range(7, 7 + c)), list(range(9, 9 + r))) for p, c, r in
             [(4, 2, 9), (10, 3, 3), (2, 20, 1), (6, 6, 6), (30, 5, 12), (3, 1, 1)]]
    shapes = {tuple(method._collate(pairs, idx, None)["input_ids"].shape) for idx in ([0, 1, 2], [3, 4, 5], [5, 0, 2])}
    assert shapes == {(6, 64)}
