"""Students: a teacher pruned to every k-th layer (warm start), and the vocabulary check for logit KD.

A student from a config (smaller width/depth, random init) needs nothing here: it is ``model.*``
with ``model.init=random`` and size overrides, built by ``trainer.models.build_model``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from trainer.config import ConfigError


def layers_to_keep(num_layers: int, keep_every_k: int) -> list[int]:
    """ceil(L / k) teacher layers spread evenly over the depth, always keeping the first and the last.

    The first layer reads the embeddings and the last one feeds the final norm and lm_head, so a
    warm start that keeps both starts from a far lower loss than ``range(0, L, k)``.
    """
    n = math.ceil(num_layers / keep_every_k)
    if n >= num_layers:
        return list(range(num_layers))
    if n == 1:
        return [num_layers - 1]
    return sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})


def pruned_state_dict(teacher_state: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """Teacher weights with decoder layers ``keep`` renumbered 0..len(keep)-1; everything else as is."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for name, tensor in teacher_state.items():
        parts = name.split(".")
        if "layers" in parts:
            i = parts.index("layers") + 1
            old = int(parts[i])
            if old not in new_index:
                continue
            parts[i] = str(new_index[old])
        out[".".join(parts)] = tensor
    return out


def prune_every_k(teacher_dir: str, keep_every_k: int, out_dir: str | Path) -> Path:
    """Save the teacher with every k-th layer (see ``layers_to_keep``) as an HF dir; returns the dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    config = teacher.config
    keep = layers_to_keep(config.num_hidden_layers, keep_every_k)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):  # per-layer attention kinds (sliding/full) follow their layers
        config.layer_types = [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = student.load_state_dict(pruned_state_dict(teacher.state_dict(), keep), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"pruning {teacher_dir}: missing={missing[:3]} unexpected={unexpected[:3]}")
    if config.tie_word_embeddings:
        student.tie_weights()
    out = Path(out_dir)
    student.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    (out / "crucible_student.json").write_text(json.dumps({"teacher": teacher_dir, "keep_every_k": keep_every_k, "layers": keep}))
    return out


def load_warm_start(model: torch.nn.Module, student_dir: str | Path, teacher: str) -> None:
    """Copy a saved student's weights into the trainer's already-built model (shapes must agree)."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(student_dir).glob("*.safetensors")):
        state.update(load_file(f))
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.endswith("lm_head.weight")]
    if wrong or missing:
        saved = json.loads((Path(student_dir) / "config.json").read_text())
        raise ConfigError(
            f"distill.student=prune_every_k builds a {saved['num_hidden_layers']}-layer student but model.* describes another shape "
            f"({(wrong or missing)[0]}); set model.path={teacher} model.init=random "
            f"model.num_layers={saved['num_hidden_layers']}"
        )
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                own[k].copy_(v)


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, what: str = "distill.teacher_logits") -> None:
    """Logit KD compares distributions token by token, which only means something over one vocabulary."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab == s_vocab:
        return
    differing = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])[:3]
    raise ConfigError(
        f"{what} needs teacher and student to share a vocabulary (teacher {len(t_vocab)} tokens, student {len(s_vocab)}; "
        f"first differences {differing}); use data-based distillation: distill.teacher_logits=none"
    )
