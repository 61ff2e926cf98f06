"""The training loop on a tiny random llama: exact accumulation, exact resume, NaN stop, checkpoints, adapters."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import list_checkpoints
from trainer.config import Config, load_config, replace
from trainer.optim import lr_multiplier
from trainer.sft import SFTMethod
from trainer.trainer import Trainer, TrainingError


def tiny_cfg(model_dir: str, out: Path, *overrides: str) -> Config:
    base = [f"model.path={model_dir}", f"output_dir={out}", "device=cpu", "precision=fp32",
            "data.source=arithmetic", "data.num_samples=160", "data.template_check=false", "data.val_fraction=0.1",
            "train.seq_len=128", "train.micro_batch_size=4", "train.lr=1e-3", "train.warmup_steps=2",
            "train.loss_chunk_size=32", "eval.max_batches=2", "checkpoint.keep_last=2", "lora.rank=4"]
    return load_config(base + list(overrides))


def losses(history: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in history if "loss" in r}


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    model = trainer.strategy.unwrap(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_grad_accumulation_is_exact(tiny_llama_dir, tmp_path):
    """micro-batch 8 == micro-batch 2 x accumulation 4 (same rows, fp32): losses and weights within 1e-5."""
    common = ["lora.enabled=false", "train.max_steps=3", "eval.every_n_steps=0", "checkpoint.save_final=false"]
    big = Trainer(tiny_cfg(tiny_llama_dir, tmp_path / "big", *common, "train.micro_batch_size=8", "train.grad_accum=1"))
    small = Trainer(tiny_cfg(tiny_llama_dir, tmp_path / "small", *common, "train.micro_batch_size=2", "train.grad_accum=4"))
    big_losses, small_losses = losses(big.train()), losses(small.train())
    assert list(big_losses) == [1, 2, 3]
    for step in big_losses:
        assert small_losses[step] == pytest.approx(big_losses[step], abs=1e-5)
    a, b = trainable_state(big), trainable_state(small)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
    assert big_losses[3] < big_losses[1]  # and it is learning


class _Interrupted(Exception):
    pass


def _resumed_after_crash(monkeypatch, cfg, crash_at_step: int) -> Trainer:
    """Train ``cfg`` until a crash at ``crash_at_step``, then the Trainer that ``resume=auto`` builds in the same dir."""
    original = Trainer.train_step

    def crash(self):
        if self.step == crash_at_step:
            raise _Interrupted
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(_Interrupted):
        Trainer(cfg).train()
    monkeypatch.setattr(Trainer, "train_step", original)
    return Trainer(cfg)


def test_resume_is_exact(tiny_llama_dir, tmp_path, monkeypatch):
    """20 steps straight == 10 steps, stop, resume=auto, 10 more: identical losses and final LoRA weights."""
    common = ["train.max_steps=20", "checkpoint.every_n_steps=10", "eval.every_n_steps=10", "eval.max_batches=1",
              "train.micro_batch_size=2", "train.grad_accum=2", "resume=auto"]
    straight = Trainer(tiny_cfg(tiny_llama_dir, tmp_path / "straight", *common))
    expected = straight.train()

    out = tmp_path / "resumed"
    resumed = _resumed_after_crash(monkeypatch, tiny_cfg(tiny_llama_dir, out, *common), crash_at_step=10)
    history = resumed.train()

    assert resumed.step == 20
    assert losses(history) == losses(expected)  # bitwise: same data position, RNG, optimizer and schedule
    val = lambda h: [(r["step"], r["val_loss"]) for r in h if "val_loss" in r]  # noqa: E731
    assert val(history) == val(expected)
    a, b = trainable_state(straight), trainable_state(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # metrics.jsonl of the resumed run reads as one run: every step once
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == list(range(1, 21))


def test_checkpoint_layout_keep_last_and_peft_adapter(tiny_llama_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_llama_dir, out, "train.max_steps=6", "checkpoint.every_n_steps=2", "eval.every_n_steps=3")
    trainer = Trainer(cfg)
    history = trainer.train()

    assert [p.name for p in list_checkpoints(out)] == ["step-000004", "step-000006"]  # keep_last=2
    ckpt = out / "checkpoints" / "step-000006"
    for name in ("model/adapter_config.json", "model/adapter_model.safetensors", "model/tokenizer.json", "optimizer.pt",
                 "scheduler.pt", "method-rank0.pt", "rng-rank0.pt", "config.yaml", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 6
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "final/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert any("val_loss" in r and "val_ppl" in r for r in history)
    assert {"step", "loss", "lr", "tokens_per_sec", "grad_norm", "peak_mem_gb"} <= set(history[0])

    # the adapter loads offline on its own and reproduces the trained model
    loaded = AutoPeftModelForCausalLM.from_pretrained(out / "final")
    assert loaded.peft_config["default"].base_model_name_or_path == tiny_llama_dir
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    trained = trainer.strategy.unwrap(trainer.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


class _NaNAtStep(SFTMethod):
    """SFT whose loss turns NaN at one optimizer step (as a diverging run would)."""

    def __init__(self, cfg, bad_step: int):
        super().__init__(cfg)
        self.bad_step, self.calls = bad_step, 0

    def loss(self, model, batch):
        out = super().loss(model, batch)
        self.calls += 1
        if (self.calls - 1) // self.cfg.train.grad_accum + 1 >= self.bad_step:  # the optimizer step being computed
            out.loss_sum = out.loss_sum * float("nan")
        return out


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_llama_dir, tmp_path):
    out = tmp_path / "nan"
    cfg = tiny_cfg(tiny_llama_dir, out, "train.max_steps=10", "checkpoint.every_n_steps=2", "eval.every_n_steps=0")
    trainer = Trainer(cfg, method=_NaNAtStep(cfg, bad_step=5))
    with pytest.raises(TrainingError) as err:
        trainer.train()
    message = str(err.value)
    assert "loss is nan at step 5" in message
    assert str(out / "checkpoints" / "step-000004") in message
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004"]  # nothing saved from the NaN state
    assert not (out / "final").exists()
    assert trainer.step == 4


def test_lr_schedules():
    cos = [lr_multiplier(s, warmup=2, total=10, kind="cosine", min_ratio=0.1) for s in range(11)]
    assert cos[:3] == [0.5, 1.0, 1.0] and cos[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(cos[1:], cos[2:]))
    lin = [lr_multiplier(s, warmup=0, total=10, kind="linear", min_ratio=0.0) for s in (0, 5, 10)]
    assert lin == [1.0, 0.5, 0.0]
    assert lr_multiplier(7, warmup=2, total=10, kind="constant", min_ratio=0.0) == 1.0


def test_precision_auto_resolves_to_fp32_on_cpu(tiny_llama_dir, tmp_path):
    cfg = load_config([f"model.path={tiny_llama_dir}", "device=cpu"])
    assert cfg.precision == "fp32"
    assert replace(cfg, precision="bf16").precision == "bf16"  # explicit bf16 on CPU: CPU autocast


def test_cpu_bf16_autocast_and_dora_train(tiny_llama_dir, tmp_path):
    """precision=bf16 on CPU runs under CPU autocast; DoRA adapters train; the loss stays finite and falls."""
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "dora", "precision=bf16", "lora.use_dora=true", "train.max_steps=8",
                   "eval.every_n_steps=0", "checkpoint.save_final=false", "train.lr=3e-3")
    history = losses(Trainer(cfg).train())
    assert history[8] < history[1]


def test_wandb_mode_is_offline_without_a_key(monkeypatch, tmp_path):
    from trainer.metrics import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"


def test_wandb_offline_run_logs_config_and_metrics(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    cfg = tiny_cfg(tiny_llama_dir, out, "train.max_steps=2", "eval.every_n_steps=0", "checkpoint.save_final=false",
                   "wandb.enabled=true", "wandb.name=unit", "wandb.tags=a,b")
    Trainer(cfg).train()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_wandb_resume_continues_the_same_run_and_logs_the_adapter(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wbr"
    common = ["eval.every_n_steps=0", "wandb.enabled=true", "wandb.log_model=true", "resume=auto", "checkpoint.every_n_steps=2"]
    Trainer(tiny_cfg(tiny_llama_dir, out, "train.max_steps=2", *common)).train()
    first_id = (out / "wandb_run_id").read_text().strip()
    Trainer(tiny_cfg(tiny_llama_dir, out, "train.max_steps=4", *common)).train()
    assert (out / "wandb_run_id").read_text().strip() == first_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    # offline-run-<date>_<time>-<id>; wandb adds "-1" when the resumed run opens within the same second
    pattern = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(first_id)}(-\d+)?")
    assert runs and all(pattern.fullmatch(r.name) for r in runs), f"a resume must reopen the run, not start another: {runs}"
    assert (out / "final" / "adapter_model.safetensors").is_file()


# --- mixed precision: cast-once bf16 weights against autocast ------------------------------------
BF16 = ["precision=bf16", "eval.every_n_steps=0", "checkpoint.save_final=false"]


def test_bf16_weights_trains_like_autocast_with_fp32_masters(tiny_llama_dir, tmp_path):
    """Full fine-tuning: bf16 params + fp32 masters follow the autocast loss curve within bf16 noise."""
    common = [*BF16, "lora.enabled=false", "train.max_steps=6"]
    autocast = losses(Trainer(tiny_cfg(tiny_llama_dir, tmp_path / "ac", *common)).train())
    trainer = Trainer(tiny_cfg(tiny_llama_dir, tmp_path / "bw", *common, "train.mixed_precision=bf16_weights"))
    cast_once = losses(trainer.train())
    for step in autocast:
        assert cast_once[step] == pytest.approx(autocast[step], rel=2e-3), step
    assert cast_once[6] < cast_once[1] - 1.0
    model = trainer.strategy.unwrap(trainer.model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    masters = trainer.optimizer.masters
    assert len(masters) == len(list(model.parameters())) and {m.dtype for m in masters} == {torch.float32}
    # the model holds exactly the rounded masters: nothing drifts between the two copies
    for p, m in zip(trainer.optimizer.model_params, masters):
        assert torch.equal(p, m.to(torch.bfloat16))


def test_bf16_weights_grad_accumulation_matches_one_big_batch(tiny_llama_dir, tmp_path):
    """micro-batch 8 == 2 x accumulation 4 under bf16 weights, within bf16 rounding of the summed gradients."""
    common = [*BF16, "lora.enabled=false", "train.max_steps=3", "train.mixed_precision=bf16_weights"]
    big = losses(Trainer(tiny_cfg(tiny_llama_dir, tmp_path / "big", *common, "train.micro_batch_size=8")).train())
    small = losses(Trainer(tiny_cfg(tiny_llama_dir, tmp_path / "small", *common, "train.micro_batch_size=2", "train.grad_accum=4")).train())
    for step in big:
        assert small[step] == pytest.approx(big[step], rel=2e-3), step


def test_bf16_weights_lora_resume_is_exact(tiny_llama_dir, tmp_path, monkeypatch):
    """The fp32 masters travel in the optimizer state: a resumed LoRA run continues bit-exactly."""
    common = [*BF16, "train.mixed_precision=bf16_weights", "train.max_steps=6", "checkpoint.every_n_steps=3",
              "train.micro_batch_size=2", "resume=auto"]
    straight = Trainer(tiny_cfg(tiny_llama_dir, tmp_path / "straight", *common))
    expected = losses(straight.train())
    resumed = _resumed_after_crash(monkeypatch, tiny_cfg(tiny_llama_dir, tmp_path / "resumed", *common), crash_at_step=3)
    assert losses(resumed.train()) == expected
    for a, b in zip(straight.optimizer.masters, resumed.optimizer.masters):
        assert torch.equal(a, b)


def test_lora_adapters_read_the_layer_input_without_a_copy_under_autocast(tiny_llama_dir, tmp_path):
    """PEFT's per-layer upcast of the input to the fp32 adapter dtype is off under autocast: each adapter
    matmul reads the adapted layer's own activation tensor (on GPU a bf16 one), not an fp32 copy of it."""
    trainer = Trainer(tiny_cfg(tiny_llama_dir, tmp_path / "dtype", *BF16, "train.max_steps=1"))
    trainer.setup()
    model = trainer.strategy.unwrap(trainer.model)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert layers
    reads: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in layers:
        layer_input: list[torch.Tensor] = []
        layer.register_forward_pre_hook(lambda m, args, seen=layer_input: seen.append(args[0]))
        layer.lora_A["default"].register_forward_pre_hook(lambda m, args, seen=layer_input: reads.append((seen[-1], args[0])))
    batch = {k: v[:, :16] for k, v in trainer.method.next_batch().items()}
    with trainer.autocast():
        trainer.method.loss(trainer.model, batch)
    assert len(reads) == len(layers)
    assert all(adapter_input is layer_input for layer_input, adapter_input in reads)


def test_bf16_weights_config_errors_name_the_key(tiny_llama_dir, tmp_path):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="train.mixed_precision=bf16_weights needs precision=bf16"):
        tiny_cfg(tiny_llama_dir, tmp_path, "train.mixed_precision=bf16_weights")
    with pytest.raises(ConfigError, match="train.optimizer=adamw_8bit"):
        tiny_cfg(tiny_llama_dir, tmp_path, "precision=bf16", "train.mixed_precision=bf16_weights", "train.optimizer=adamw_8bit")


# --- torch.compile ---------------------------------------------------------------------------------
def test_compiled_lora_run_with_checkpointing_and_packing_matches_eager(tiny_model_factory, tmp_path):
    """train.compile=true (per layer, around the checkpoint) with LoRA + packing: eager's losses, no graph
    break, and layers share their compiled graphs instead of compiling one each."""
    from torch._dynamo.utils import counters

    model_dir = tiny_model_factory("llama", num_hidden_layers=3)
    common = ["train.max_steps=2", "eval.every_n_steps=0", "checkpoint.save_final=false", "train.activation_checkpointing=full",
              "data.packing=true", "train.seq_len=64", "train.micro_batch_size=2"]
    eager = losses(Trainer(tiny_cfg(model_dir, tmp_path / "eager", *common)).train())
    graphs_after_step: list[int] = []

    class GraphCountingTrainer(Trainer):
        def train_step(self):
            record = super().train_step()
            graphs_after_step.append(counters["stats"]["unique_graphs"])
            return record

    torch._dynamo.reset()
    counters.clear()
    compiled = losses(GraphCountingTrainer(tiny_cfg(model_dir, tmp_path / "compiled", *common, "train.compile=true")).train())
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], abs=1e-4), step
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Graphs do not grow with depth: layer 0 (input needs no grad under LoRA) and the other layers, each
    # with and without a packed-document mask (a row holding one document needs none). One graph per
    # layer would be 6 here. (The final evaluation, under no_grad, compiles its own.)
    assert graphs_after_step[-1] <= 4, graphs_after_step
