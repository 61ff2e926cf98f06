"""DistillMethod through the Method contract: offline top-k (k = V) = online teacher on packed batches,
training lowers the KD loss, exact resume, on-policy batches with engine sync, and the final evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.kd import DistillMethod
from parallel.base import Strategy
from trainer.config import ConfigError, load_config
from trainer.methods import Run
from trainer.models import build_model, load_tokenizer


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_factory) -> str:
    return tiny_model_factory("llama", seed=0, num_hidden_layers=4)


def _cfg(out: Path, teacher: str, *extra: str):
    return load_config([
        "train.method=distill", f"distill.teacher={teacher}", "distill.student=prune_every_k", "distill.keep_every_k=2",
        f"model.path={teacher}", "model.init=random", "model.num_layers=2", "lora.enabled=false",
        "data.source=arithmetic", "data.num_samples=12", "data.val_fraction=0.25", "train.seq_len=128", "train.micro_batch_size=2",
        "device=cpu", "precision=fp32", f"output_dir={out}", "distill.evaluate=false", "engine.num_blocks=64", *extra,
    ])


def _setup(cfg) -> tuple[DistillMethod, Run]:
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg, "cpu")
    run = Run(cfg, tokenizer, model, Strategy(cfg), torch.device("cpu"), Path(cfg.output_dir), log=lambda msg: None)
    method = DistillMethod(cfg)
    method.setup(run)
    return method, run


def _step(method: DistillMethod, run: Run, batch, lr: float = 1e-3) -> dict:
    """One optimizer step the way the trainer takes it: summed loss / normalizer."""
    opt = torch.optim.SGD(run.model.parameters(), lr=lr)
    out = method.loss(run.model, batch)
    (out.loss_sum / method.normalizer(batch)).backward()
    opt.step()
    opt.zero_grad()
    return out.metrics


def test_offline_topk_cache_with_full_vocab_equals_online_teacher_and_resumes_exactly(tmp_path, teacher_dir):
    online, run = _setup(_cfg(tmp_path / "online", teacher_dir, "distill.loss=jsd", "distill.temperature=2.0", "distill.ce_weight=0.3"))
    assert (tmp_path / "online" / "student_init" / "config.json").is_file()  # the warm start, saved as an HF dir
    state = online.state_dict()
    batch = online.next_batch()
    assert (batch["position_ids"] == 0).sum() > batch["input_ids"].shape[0]  # packed: several documents per row
    want = online.loss(run.model, batch)

    vocab = run.unwrapped.config.vocab_size
    offline, run2 = _setup(_cfg(tmp_path / "offline", teacher_dir, "distill.loss=jsd", "distill.temperature=2.0",
                                "distill.ce_weight=0.3", "distill.teacher_logits=offline", f"distill.topk={vocab}"))
    assert (tmp_path / "offline" / "teacher_topk.safetensors").is_file()
    got = offline.loss(run2.model, batch)
    n = online.normalizer(batch)
    assert n == offline.normalizer(batch) > 0
    torch.testing.assert_close(got.loss_sum / n, want.loss_sum / n, rtol=1e-2, atol=1e-3)
    assert got.metrics["kd"] == pytest.approx(want.metrics["kd"], rel=1e-2, abs=1e-3)

    online.load_state_dict(state)  # exact resume: the same micro-batch again
    assert torch.equal(online.next_batch()["input_ids"], batch["input_ids"])


def test_training_steps_lower_the_kd_loss_and_validation_reports_it(tmp_path, teacher_dir):
    method, run = _setup(_cfg(tmp_path, teacher_dir, "distill.loss=forward_kl"))
    batch = method.next_batch()
    before = method.loss(run.model, batch).metrics["kd"]
    for _ in range(3):
        _step(method, run, batch, lr=0.05)
    after = method.loss(run.model, batch).metrics["kd"]
    assert after < before
    val = method.evaluate(run)
    assert set(val) == {"val_loss", "val_ppl", "val_kd"} and val["val_ppl"] > 1


def test_online_teacher_runs_without_grad_and_no_head_sees_more_than_a_chunk(tmp_path, teacher_dir):
    chunk = 4
    method, run = _setup(_cfg(tmp_path, teacher_dir, f"distill.chunk_size={chunk}"))
    teacher = run.strategy.unwrap(method.teacher)
    head_rows = {"teacher": [], "student": []}
    grad_in_teacher = []
    hooks = [
        teacher.get_output_embeddings().register_forward_hook(
            lambda mod, args, out: head_rows["teacher"].append(args[0].shape[:-1].numel())),
        run.unwrapped.get_output_embeddings().register_forward_hook(lambda mod, args, out: head_rows["student"].append(args[0].shape[:-1].numel())),
        teacher.get_decoder().register_forward_hook(lambda mod, args, out: grad_in_teacher.append(torch.is_grad_enabled())),
    ]
    batch = method.next_batch()
    n = method.normalizer(batch)
    assert n > 2 * chunk  # several chunks, so a whole-batch projection would show
    (method.loss(run.model, batch).loss_sum / n).backward()
    for h in hooks:
        h.remove()
    assert grad_in_teacher == [False]  # one teacher forward per micro-batch, outside autograd
    # full-vocabulary logits exist for one chunk at a time: after the forward's last-position row per sequence,
    # the teacher's head projects the n trained positions chunk by chunk, in the forward and again when the
    # backward recomputes each chunk
    rows = batch["input_ids"].shape[0]
    assert head_rows["teacher"][0] == rows and sum(head_rows["teacher"][1:]) == 2 * n
    assert max(head_rows["teacher"]) <= chunk and max(head_rows["student"]) <= chunk
    assert all(p.grad is None for p in teacher.parameters())


def test_on_policy_batches_are_student_samples_and_the_engine_follows_the_student(tmp_path, teacher_dir):
    method, run = _setup(_cfg(tmp_path, teacher_dir, "distill.on_policy_ratio=1.0", "distill.on_policy_max_new_tokens=4"))
    batch = method.next_batch()
    assert int(batch["on_policy"]) == 1
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        trained = [i for i, label in enumerate(labels) if label != -100]
        assert 0 < len(trained) <= 4
        assert ids[: trained[0]] in method.prompts  # a real training prompt, answered by the student
    metrics = _step(method, run, batch, lr=0.05)
    assert "kd" in metrics and "ce" not in metrics  # no cross-entropy on the student's own tokens
    assert method.after_optimizer_step(run, 1)["engine_synced_tensors"] > 0
    seq = batch["input_ids"][0][batch["labels"][0] != -100].tolist()
    seq = method.prompts[0] + seq
    with torch.no_grad():
        logp = torch.log_softmax(run.model(torch.tensor([seq])).logits[0, :-1].float(), -1)
    want = logp.gather(-1, torch.tensor(seq[1:])[:, None]).flatten()
    got = torch.tensor(method.llm.score([seq])[0][1:])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # the engine now scores with the trained weights


def test_finish_compares_student_before_after_and_teacher(tmp_path, teacher_dir):
    method, run = _setup(_cfg(tmp_path, teacher_dir, "distill.evaluate=true", "distill.eval_num_texts=2",
                              "distill.eval_num_problems=2", "distill.eval_max_new_tokens=4"))
    _step(method, run, method.next_batch(), lr=0.05)
    method.finish(run, [{"step": 1, "loss": 2.0, "kd": 1.0, "ce": 3.0}])
    results = json.loads((tmp_path / "distill_eval.json").read_text())
    assert list(results) == ["student-before", "student-after", "teacher"]
    for metrics in results.values():
        assert metrics["perplexity"] > 1 and 0 <= metrics["arithmetic_accuracy"] <= 1
    assert results["teacher"]["teacher_agreement"] > 0.95  # the teacher agrees with its own greedy tokens
    assert results["student-after"] != results["student-before"]
    assert (tmp_path / "distill_eval.png").stat().st_size > 0 and (tmp_path / "distill_curves.png").is_file()
    assert (tmp_path / "student_final" / "config.json").is_file()


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="distill.on_policy_ratio.*teacher_logits=online"):
        load_config(["train.method=distill", "lora.enabled=false", "distill.on_policy_ratio=0.5", "distill.teacher_logits=offline"])
    with pytest.raises(ConfigError, match="distill.jsd_beta"):
        load_config(["train.method=distill", "lora.enabled=false", "distill.jsd_beta=1.0"])
    with pytest.raises(ConfigError, match="prune_every_k.*lora.enabled=false"):
        load_config(["train.method=distill", "distill.student=prune_every_k"])


def test_nf4_teacher_is_quantized_and_gives_nearly_the_same_distribution(tmp_path, teacher_dir):
    from distill.teacher import load_teacher
    from trainer.sft import final_hidden_states, output_head

    cfg = _cfg(tmp_path, teacher_dir, "distill.teacher_quant=nf4", "quant.compute_dtype=fp32")
    nf4 = load_teacher(cfg, torch.device("cpu"))
    full = load_teacher(_cfg(tmp_path, teacher_dir), torch.device("cpu"))
    assert any("Linear4bit" in type(m).__name__ for m in nf4.modules())
    assert not any(p.requires_grad for p in nf4.parameters())
    ids = torch.randint(0, 1000, (1, 12))
    batch = {"input_ids": ids, "position_ids": torch.arange(12)[None]}
    with torch.no_grad():
        p_nf4 = torch.softmax(output_head(nf4)(final_hidden_states(nf4, batch)).float(), -1)
        p_full = torch.softmax(output_head(full)(final_hidden_states(full, batch)).float(), -1)
    assert (p_nf4 - p_full).abs().sum(-1).max() < 0.5  # total variation: close, though 4-bit weights are not exact
