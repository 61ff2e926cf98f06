"""Students: layer choice, the pruned HF dir keeps the teacher's layers, shape and vocabulary errors are clear."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.students import check_same_vocabulary, layers_to_keep, load_warm_start, prune_every_k
from trainer.config import ConfigError


@pytest.mark.parametrize("layers,k", [(30, 3), (30, 2), (6, 2), (4, 2), (5, 1), (5, 10)])
def test_layers_to_keep_takes_ceil_l_over_k_layers_including_the_last(layers, k):
    keep = layers_to_keep(layers, k)
    assert len(keep) == math.ceil(layers / k) == len(set(keep))
    assert keep == sorted(keep) and keep[-1] == layers - 1
    if len(keep) > 1:
        assert keep[0] == 0
    assert layers_to_keep(30, 3) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]


def test_pruned_student_is_an_hf_dir_with_the_teachers_layers(tiny_model_factory, tmp_path):
    teacher_dir = tiny_model_factory("llama", seed=0, num_hidden_layers=4)
    out = prune_every_k(teacher_dir, 2, tmp_path / "student")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2
    assert json.loads((out / "crucible_student.json").read_text())["layers"] == [0, 3]
    for new, old in enumerate([0, 3]):
        torch.testing.assert_close(student.model.layers[new].mlp.up_proj.weight, teacher.model.layers[old].mlp.up_proj.weight)
        torch.testing.assert_close(student.model.layers[new].self_attn.q_proj.weight, teacher.model.layers[old].self_attn.q_proj.weight)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    torch.testing.assert_close(student.model.norm.weight, teacher.model.norm.weight)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(teacher_dir).get_vocab()

    # a trainer-built model of the right shape takes the warm start; a wrong shape says which model.* to set
    same = AutoModelForCausalLM.from_config(student.config)
    load_warm_start(same, out, teacher="t")
    torch.testing.assert_close(same.model.layers[1].mlp.down_proj.weight, teacher.model.layers[3].mlp.down_proj.weight)
    with pytest.raises(ConfigError, match="model.num_layers=2"):
        load_warm_start(AutoModelForCausalLM.from_config(teacher.config), out, teacher="t")


def test_logit_kd_refuses_different_vocabularies(tiny_llama_dir):
    teacher_tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    student_tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    check_same_vocabulary(teacher_tok, student_tok)
    student_tok.add_tokens(["<extra_tool_token>"])
    with pytest.raises(ConfigError, match="share a vocabulary.*distill.teacher_logits=none"):
        check_same_vocabulary(teacher_tok, student_tok)
