"""Merged export (LoRA, DoRA, QLoRA), run-dir resolution, bad input, atomic outputs, the launcher."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from export.merge import merged_model, reference_model, resolve_source
from export.pipeline import atomic_output
from trainer.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _make_run(tmp_path: Path, base_dir: str, kind: str) -> Path:
    """A trainer-shaped run dir: <run>/config.yaml and <run>/checkpoints/step-N/model/ with a PEFT adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                      use_dora=kind == "dora"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    run = tmp_path / f"run-{kind}"
    for step in (5, 10):
        model.save_pretrained(run / "checkpoints" / f"step-{step}" / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"quant": {"load_in_4bit": kind == "qlora", "quant_type": "nf4", "double_quant": True}}))
    return run


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
def test_merged_model_matches_adapter_on_base(tiny_llama_dir, tmp_path, kind):
    run = _make_run(tmp_path, tiny_llama_dir, kind)
    src = resolve_source(str(run))
    assert src.method == kind and src.path.endswith("step-10/model")
    reference = reference_model(src)
    merged = merged_model(src, reference)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
    if kind == "qlora":  # the base weights are the NF4 ones the training forward used, not the fp originals
        from transformers import AutoModelForCausalLM

        fp = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        k = fp.model.layers[0].self_attn.k_proj.weight  # no adapter on k_proj: merged k_proj is the dequantized NF4
        nf4 = merged.model.layers[0].self_attn.k_proj.weight
        assert not torch.equal(nf4, k) and (nf4 - k).abs().max() < 0.1 * k.abs().max()


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_llama_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no model"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="model_type='gpt2' is not supported"):
        resolve_source(str(gpt2))
    from trainer.config import load_config

    with pytest.raises(ConfigError, match="verify.backend=llama_cpp"):
        load_config(["run=x", "format=awq", "verify.backend=llama_cpp"])
    with pytest.raises(ConfigError, match="format='onnx'"):
        load_config(["run=x", "format=onnx"])


def test_failed_export_leaves_no_artifact(tmp_path):
    final = tmp_path / "out.gguf"
    with pytest.raises(RuntimeError):
        with atomic_output(final, is_dir=False, overwrite=False) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("quantizer crashed")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(final, is_dir=False, overwrite=False) as tmp:
        tmp.write_bytes(b"complete")
    assert final.read_bytes() == b"complete"
    with pytest.raises(ConfigError, match="already exists"):
        with atomic_output(final, is_dir=False, overwrite=False):
            pass


def test_launcher_exports_merged_and_gguf_and_verifies(tiny_llama_dir, tmp_path):
    """End to end through launch/export.py: a LoRA run -> merged dir (transformers loads it) and Q8_0 GGUF + adapter."""
    import subprocess
    import sys

    run = _make_run(tmp_path, tiny_llama_dir, "lora")
    base = [sys.executable, str(ROOT / "launch" / "export.py"), f"run={run}", "verify.backend=transformers",
            "verify.num_seqs=2", "verify.seq_len=64", "verify.greedy_tokens=8"]
    merged = subprocess.run(base + ["format=merged", f"output_dir={tmp_path / 'merged'}"], capture_output=True, text=True, cwd=ROOT)
    assert merged.returncode == 0, merged.stdout[-3000:] + merged.stderr[-3000:]
    assert "top-1 agreement" in merged.stdout and "FAIL" not in merged.stdout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template
    # a random tiny model's near-flat logits make argmax agreement under Q8_0 noisy: report, don't gate
    gguf_run = subprocess.run(base + ["format=gguf", "gguf.type=q8_0", "verify.strict=false", f"output_dir={tmp_path / 'gguf'}"],
                              capture_output=True, text=True, cwd=ROOT)
    assert gguf_run.returncode == 0, gguf_run.stdout[-3000:] + gguf_run.stderr[-3000:]
    assert "perplexity change" in gguf_run.stdout
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["run-lora-lora.gguf", "run-lora-q8_0.gguf"]
    again = subprocess.run(base + ["format=gguf", f"output_dir={tmp_path / 'gguf'}"], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "already exists" in again.stdout
