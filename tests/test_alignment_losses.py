"""Preference losses and GRPO math against formulas written out independently, and against TRL."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from alignment import losses as L
from alignment import rl
from alignment.sequences import Document, rows_from_documents, sum_by_document, token_logprobs


def _pairs(seed: int = 0, n: int = 6) -> L.PairLogps:
    g = torch.Generator().manual_seed(seed)
    rand = lambda: -torch.rand(n, generator=g, dtype=torch.float64) * 20 - 1  # noqa: E731
    return L.PairLogps(rand(), rand(), torch.randint(1, 9, (n,), generator=g).double(), torch.randint(1, 9, (n,), generator=g).double(),
                       rand(), rand())


def _cfg(**kw):
    return SimpleNamespace(**{"beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5, **kw})


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _reference_loss(name: str, c, r, rc, rr, lc, lr, beta, eps, gamma) -> float:
    """The papers' formulas, one pair at a time, in plain Python floats."""
    h = (c - rc) - (r - rr)
    if name == "sigmoid":
        return -math.log(_sig(beta * h))
    if name == "cdpo":
        return -(1 - eps) * math.log(_sig(beta * h)) - eps * math.log(_sig(-beta * h))
    if name == "robust":
        return ((1 - eps) * -math.log(_sig(beta * h)) - eps * -math.log(_sig(-beta * h))) / (1 - 2 * eps)
    if name == "hinge":
        return max(0.0, 1 - beta * h)
    if name == "ipo":
        return ((c - rc) / lc - (r - rr) / lr - 1 / (2 * beta)) ** 2
    if name == "simpo":
        z = beta * (c / lc - r / lr) - gamma
        return -(1 - eps) * math.log(_sig(z)) - eps * math.log(_sig(-z))
    if name == "orpo":
        pc, pr = math.exp(c / lc), math.exp(r / lr)
        log_odds_ratio = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
        return -c / lc - beta * math.log(_sig(log_odds_ratio))
    raise KeyError(name)


@pytest.mark.parametrize("name", ["sigmoid", "cdpo", "robust", "hinge", "ipo", "simpo", "orpo"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_preference_losses_match_the_papers_formulas(name, eps):
    lp = _pairs(seed=len(name))
    cfg = _cfg(beta=0.3, label_smoothing=eps, simpo_gamma=0.4)
    got = L.PREFERENCE_LOSSES[name](lp, cfg)
    for i in range(len(got)):
        want = _reference_loss(name, *(float(t[i]) for t in (lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected,
                                                               lp.chosen_tokens, lp.rejected_tokens)), 0.3, eps, 0.4)
        assert float(got[i]) == pytest.approx(want, rel=1e-9, abs=1e-12), (name, i)


def test_reference_free_losses_need_no_reference():
    assert not L.needs_reference("simpo") and not L.needs_reference("orpo") and L.needs_reference("sigmoid")
    lp = _pairs()
    lp.ref_chosen = lp.ref_rejected = None
    assert torch.isfinite(L.PREFERENCE_LOSSES["simpo"](lp, _cfg(beta=2.0))).all()
    chosen, rejected = L.implicit_rewards(lp, _cfg(beta=2.0))
    assert torch.allclose(chosen, 2.0 * lp.chosen / lp.chosen_tokens)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    lp = _pairs()
    lp.chosen.requires_grad_(True)
    lp.rejected.requires_grad_(True)
    L.PREFERENCE_LOSSES["sigmoid"](lp, _cfg()).sum().backward()
    assert (lp.chosen.grad < 0).all() and (lp.rejected.grad > 0).all()  # descent increases chosen, decreases rejected


# ---------------------------------------------------------------------------------------------
# Per-token log-probs through the chunked LM head
# ---------------------------------------------------------------------------------------------
def _full_logits_logprobs(model, rows, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: whole [R, T, vocab] fp32 logits, log-softmax, gather (what the chunked path must equal)."""
    logits = model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False).logits[:, :-1].float() / temperature
    logp = logits.log_softmax(-1).gather(-1, rows["input_ids"][:, 1:, None]).squeeze(-1)
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    return torch.nn.functional.pad(logp, (1, 0)), torch.nn.functional.pad(entropy, (1, 0))


@pytest.mark.parametrize("chunk_size", [5, 0])
def test_chunked_logprobs_equal_full_logits_values_and_grads(tiny_llama_dir, chunk_size):
    """Chunks of 5 tokens (several chunks, a ragged last one) and unchunked: same log-probs, entropies and gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    docs = [Document(torch.randint(5, 500, (p,), generator=g).tolist(), torch.randint(5, 500, (c,), generator=g).tolist())
            for p, c in [(6, 4), (3, 7), (9, 2), (4, 5)]]
    rows = rows_from_documents(docs, seq_len=32, packing=True)
    scored = rows["doc_index"] >= 0
    weights = torch.rand(scored.shape, generator=g)  # a loss that weighs every token differently

    def grads_of(logp):
        model.zero_grad()
        (logp * weights * scored).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_logp, ref_entropy = _full_logits_logprobs(model, rows, temperature=0.7)
    ref_grads = grads_of(ref_logp)
    logp, entropy = token_logprobs(model, rows, temperature=0.7, with_entropy=True, chunk_size=chunk_size)
    got_grads = grads_of(logp)

    assert torch.allclose(logp[scored], ref_logp[scored], atol=1e-5)
    assert torch.equal(logp[~scored], torch.zeros_like(logp[~scored]))  # prompts and padding are not scored
    assert torch.allclose(entropy[scored], ref_entropy[scored], atol=1e-5) and not entropy.requires_grad
    for name, want in ref_grads.items():
        assert torch.allclose(got_grads[name], want, atol=1e-5, rtol=1e-4), name


def test_chunked_logprobs_never_hold_the_whole_vocabulary_logits():
    """The head sees at most chunk_size rows, in the forward and in the backward's recomputation."""
    from alignment.sequences import chunked_token_logprobs

    head = torch.nn.Linear(8, 50, bias=False)
    seen = []
    head.register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    hidden, targets = torch.randn(23, 8, requires_grad=True), torch.randint(0, 50, (23,))
    logp, _ = chunked_token_logprobs(hidden, targets, head, chunk_size=8)
    logp.sum().backward()
    assert max(seen) == 8 and sum(seen) == 2 * 23  # forward + recomputation, 8 rows at a time
    full = hidden.detach().clone().requires_grad_(True)
    want = torch.log_softmax(head(full), -1).gather(-1, targets[:, None]).squeeze(-1)
    want.sum().backward()
    assert torch.allclose(logp, want, atol=1e-6) and torch.allclose(hidden.grad, full.grad, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Against TRL's DPOTrainer on the same batch and models
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trl_setup(tiny_model_factory, tmp_path_factory):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, ref_path = tiny_model_factory("llama", seed=0), tiny_model_factory("llama", seed=1)
    tok = AutoTokenizer.from_pretrained(path)
    rows = [{"prompt": "What is 2 + 3?", "chosen": " 5", "rejected": " 6 or so"},
            {"prompt": "Name a colour.", "chosen": " Blue is a colour.", "rejected": " Seven"}]
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32)
    return SimpleNamespace(tok=tok, dataset=Dataset.from_list(rows), policy=policy, ref=ref, out=tmp_path_factory.mktemp("trl"))


def _trl_loss_and_batch(setup, loss_type: str, beta: float, label_smoothing: float = 0.0):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(setup.out), beta=beta, loss_type=[loss_type], label_smoothing=label_smoothing,
                     per_device_train_batch_size=2, report_to="none", use_cpu=True, bf16=False, max_length=None)
    trainer = DPOTrainer(model=setup.policy, ref_model=setup.ref, args=args, train_dataset=setup.dataset, processing_class=setup.tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return float(loss), batch, trainer.model


def _our_loss(batch, policy, ref, name: str, cfg) -> float:
    """Our path on TRL's tokens: documents -> packed rows -> per-token log-probs -> per-pair sums -> loss."""
    docs = []
    for ids, keep, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        ids, completion = ids[keep.bool()].tolist(), completion[keep.bool()].tolist()
        start = completion.index(1)
        docs.append(Document(ids[:start], ids[start:]))
    half = len(docs) // 2  # TRL stacks [chosen..., rejected...]
    docs = [d for pair in zip(docs[:half], docs[half:]) for d in pair]
    rows = rows_from_documents(docs, seq_len=256, packing=True)
    with torch.no_grad():
        sums = sum_by_document(token_logprobs(policy, rows)[0], rows["doc_index"], len(docs)).double()
        ref_sums = sum_by_document(token_logprobs(ref, rows)[0], rows["doc_index"], len(docs)).double()
    lengths = torch.tensor([len(d.completion_ids) for d in docs], dtype=torch.float64)
    lp = L.PairLogps(sums[0::2], sums[1::2], lengths[0::2], lengths[1::2], ref_sums[0::2], ref_sums[1::2])
    return float(L.PREFERENCE_LOSSES[name](lp, cfg).mean())


@pytest.mark.parametrize("ours,theirs,beta,eps", [("sigmoid", "sigmoid", 0.1, 0.0), ("hinge", "hinge", 0.5, 0.0),
                                                  ("ipo", "ipo", 0.1, 0.0), ("robust", "robust", 0.1, 0.2)])
def test_loss_equals_trl_dpo_trainer(trl_setup, ours, theirs, beta, eps):
    trl_loss, batch, model = _trl_loss_and_batch(trl_setup, theirs, beta, eps)
    got = _our_loss(batch, model, trl_setup.ref, ours, _cfg(beta=beta, label_smoothing=eps))
    assert abs(trl_loss - math.log(2)) > 1e-3, "policy and reference must differ for the comparison to mean anything"
    assert got == pytest.approx(trl_loss, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# GRPO math
# ---------------------------------------------------------------------------------------------
def test_grpo_advantages_are_group_normalised():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = rl.ADVANTAGES["grpo"](rewards, group_size=4, scale=True)
    group = torch.tensor([1.0, 0.0, 0.0, 1.0])
    want = (group - group.mean()) / (group.std() + 1e-4)
    assert torch.allclose(adv[:4], want)
    assert torch.equal(adv[4:], torch.zeros(4))  # a group of equal rewards carries no signal
    unscaled = rl.ADVANTAGES["grpo"](rewards, group_size=4, scale=False)
    assert torch.allclose(unscaled[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_rloo_baseline_leaves_one_out():
    rewards = torch.tensor([3.0, 0.0, 0.0])
    adv = rl.ADVANTAGES["rloo"](rewards, group_size=3, scale=False)
    assert torch.allclose(adv, torch.tensor([3.0, -1.5, -1.5]))


def test_clipped_policy_loss_clips_only_the_side_that_would_overshoot():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]]))  # ratios 1.5, 1, 0.5
    adv = torch.tensor([1.0, -1.0])
    loss, clipped = rl.POLICY_LOSSES["clip"](logp, old, adv, 0.2, 0.2)
    # A > 0: the 1.5 ratio is capped at 1.2; the 0.5 ratio is kept (min picks the pessimistic term).
    assert torch.allclose(loss[0], torch.tensor([-1.2, -1.0, -0.5]))
    # A < 0: the 0.5 ratio is raised to 0.8 (pessimistic); the 1.5 ratio is kept.
    assert torch.allclose(loss[1], torch.tensor([1.5, 1.0, 0.8]))
    assert clipped.tolist() == [[True, False, False], [False, False, True]]


def test_k3_kl_is_non_negative_and_matches_the_formula():
    logp, ref = torch.randn(4, 5), torch.randn(4, 5)
    k3 = rl.KL_ESTIMATORS["k3"](logp, ref)
    assert (k3 >= 0).all()
    assert torch.allclose(k3, torch.exp(ref - logp) - (ref - logp) - 1)
    assert torch.allclose(rl.KL_ESTIMATORS["k3"](logp, logp), torch.zeros(4, 5))


def test_loss_aggregations():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(rl.LOSS_AGGREGATIONS["grpo"](x, m, 8)) == pytest.approx((1.0 + 4.0) / 2)  # mean of sequence means
    assert float(rl.LOSS_AGGREGATIONS["dapo"](x, m, 8)) == pytest.approx(8.0 / 5)  # mean over all 5 tokens
    assert float(rl.LOSS_AGGREGATIONS["dr_grpo"](x, m, 8)) == pytest.approx(8.0 / 8 / 2)  # token sum / budget / sequences


@pytest.mark.parametrize("agg", ["grpo", "dr_grpo", "dapo"])
def test_aggregation_sums_accumulate_exactly(agg):
    """Two half batches summed and divided by summed units equal the whole batch: exact accumulation."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 5, generator=g)
    m = (torch.rand(6, 5, generator=g) > 0.3).float()
    a = rl.LOSS_AGGREGATIONS[agg]
    whole = a(x, m, 5)
    split = (a.loss_sum(x[:2], m[:2], 5) + a.loss_sum(x[2:], m[2:], 5)) / (a.units(m[:2], 5) + a.units(m[2:], 5))
    assert float(split) == pytest.approx(float(whole), rel=1e-6)
