"""Logit KD transfers more of the teacher than cross-entropy on the teacher's own samples, at the same budget."""
from __future__ import annotations

import torch
import transformers

from distill.losses import KDSpec, TeacherSide, chunked_kd_loss
from distill.teacher import trained_positions
from trainer.sft import final_hidden_states, output_head

VOCAB = 128


def _tiny(seed: int, layers: int, scale: float) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, scale)
    return model


def _batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}


def test_kd_student_agrees_with_teacher_more_than_a_cross_entropy_student():
    teacher = _tiny(seed=0, layers=2, scale=0.15).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, VOCAB, (96, 1), generator=g)
    with torch.no_grad():  # the dataset: the teacher's own samples (what data-based distillation trains on)
        for _ in range(20):
            seqs = torch.cat([seqs, torch.multinomial(torch.softmax(teacher(seqs).logits[:, -1], -1), 1, generator=g)], 1)
    train, held_out = seqs[:64], seqs[64:]

    def agreement(student) -> float:
        with torch.no_grad():
            return (student(held_out).logits.argmax(-1) == teacher(held_out).logits.argmax(-1)).float().mean().item()

    def fit(with_kd: bool) -> float:
        student = _tiny(seed=1, layers=1, scale=0.02)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
        for step in range(20):  # same data order, steps and learning rate for both students
            batch = _batch(train[(step * 16) % 64 : (step * 16) % 64 + 16])
            mask, targets = trained_positions(batch)
            hidden = final_hidden_states(student, batch)[:, :-1][mask]
            side = None
            if with_kd:
                with torch.no_grad():
                    side = TeacherSide(hidden=final_hidden_states(teacher, batch)[:, :-1][mask], head=output_head(teacher))
            loss, _ = chunked_kd_loss(hidden, output_head(student), targets, side, KDSpec("forward_kl"), ce_weight=0.0, chunk_size=128)
            (loss / targets.numel()).backward()
            opt.step()
            opt.zero_grad()
        return agreement(student)

    kd, ce = fit(with_kd=True), fit(with_kd=False)
    assert kd > ce + 0.03, f"KD agreement {kd:.3f} vs CE {ce:.3f}"
    assert kd > 2 / VOCAB * 4  # far above chance
