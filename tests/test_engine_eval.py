"""launch/eval.py and the trainer's eval hooks, on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch

from launch.eval import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_eval_cli_reports_perplexity_and_accuracy(tiny_llama_dir, tmp_path, capsys):
    code = main([f"model.path={tiny_llama_dir}", "eval.num_task_samples=4", f"output_dir={tmp_path}", "engine.num_blocks=64"])
    assert code == 0
    results = json.loads((tmp_path / "eval_results.json").read_text())
    vocab = 49152
    assert 1.0 < results["metrics"]["perplexity"] < 10 * vocab  # a random model: near-uniform, but finite
    assert 0.0 <= results["metrics"]["arithmetic_accuracy"] <= 1.0 and results["tasks"]["arithmetic"]["total"] == 4
    assert "arithmetic accuracy" in capsys.readouterr().out


def test_eval_cli_config_errors_exit_2(tmp_path, capsys):
    assert main([f"model.path={tmp_path}/missing", f"output_dir={tmp_path}"]) == 2
    assert main(["eval.tasks=trivia", f"output_dir={tmp_path}"]) == 2
    assert "trivia" in capsys.readouterr().err


def test_evaluate_model_syncs_live_peft_weights(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.evaluate import _ENGINES, evaluate_model, perplexity
    from trainer.config import load_config

    cfg = load_config([f"model.path={tiny_llama_dir}", "eval.num_task_samples=2", "engine.num_blocks=64"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    before = evaluate_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # "training" moved the adapter
    after = evaluate_model(model, cfg)
    assert after["eval/perplexity"] != before["eval/perplexity"]
    # the engine saw the merged weights; the live model was left unmerged
    merged = model.merge_and_unload()
    llm = _ENGINES.popitem()[1]
    text = ["What is 1 + 1? It is 2, of course."]
    ids = torch.tensor([llm.tokenizer.encode(text[0])])
    with torch.no_grad():
        ref = merged(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).mean()
    assert perplexity(llm, text)["nll"] == pytest.approx(-ref.item(), abs=1e-4)


def test_eval_cli_takes_an_adapter_dir_as_model_path(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")  # adapter_config.json names the base directory
    code = main([f"model.path={tmp_path / 'adapter'}", "eval.num_task_samples=2", f"output_dir={tmp_path}", "engine.num_blocks=64"])
    assert code == 0
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["adapter"] == str(tmp_path / "adapter")
