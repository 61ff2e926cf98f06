"""GRPO on two CPU ranks (``torchrun --nproc_per_node=2``, gloo) under each parallel strategy.

Each rank rolls out its own share of the prompts on its own colocated engine; after every optimizer
step every rank syncs its engine from the (identical) policy. The test launches this file as the
torchrun script: each rank trains with ``ProbedGRPO``, which at the end writes what the test checks
to ``<output_dir>/rank<r>.pt``: the prompts its rollouts used, the merged policy weights its engine
receives, and the log-probs of one fixed sequence as scored by its engine and by its trainer.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROBE_IDS = [1, 17, 230, 9, 4021, 77, 5, 312, 64, 8]  # a fixed sequence every rank scores at the end
ROLLED_OUT: list[str] = []  # prompts this process's rollouts were scored on (filled by the reward below)


def first_token_div4(prompts, completions, completion_ids, **_):
    """A reward a tiny random model can learn, which also records the prompts this rank rolled out."""
    ROLLED_OUT.extend(prompts)
    return [float(ids[0] % 4 == 0) for ids in completion_ids]


# ---------------------------------------------------------------------------------------------
# The torchrun side
# ---------------------------------------------------------------------------------------------
def _probed_method(cfg):
    from alignment.grpo import GRPOMethod
    from alignment.rollout import policy_weights
    from alignment.sequences import Document, rows_from_documents, token_logprobs

    class ProbedGRPO(GRPOMethod):
        def finish(self, run, history):
            super().finish(run, history)
            # every rank runs the same collectives here (FSDP2 gathers weights and runs forwards in lockstep)
            policy = {name: t.float().cpu() for name, t in policy_weights(run.unwrapped, changed_only=True)}
            rows = rows_from_documents([Document(PROBE_IDS[:3], PROBE_IDS[3:])], seq_len=len(PROBE_IDS), packing=False)
            run.unwrapped.eval()
            with torch.no_grad():
                trainer_lp = token_logprobs(run.unwrapped, {k: v.to(run.device) for k, v in rows.items()})[0][0, 3:].cpu()
            engine_lp = torch.tensor(self.rollout.llm.score([PROBE_IDS])[0][3:])
            from tests import test_grpo_multirank as probe  # the module the reward registry imported

            torch.save({"prompts": list(probe.ROLLED_OUT), "policy": policy, "trainer_logprobs": trainer_lp,
                        "engine_logprobs": engine_lp, "syncs": self.rollout.syncs},
                       Path(run.output_dir) / f"rank{run.strategy.rank}.pt")

    return ProbedGRPO(cfg)


def _worker(argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    from trainer.config import load_config
    from trainer.trainer import Trainer

    cfg = load_config(argv)
    Trainer(cfg, method=_probed_method(cfg)).train()


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------
def _write_prompts(path: Path, n: int) -> str:
    """Distinct prompts, so 'different prompts per rank' is a statement about rows, not about collisions."""
    path.write_text("".join(json.dumps({"prompt": f"Item {i}: say a word."}) + "\n" for i in range(n)))
    return str(path)


def _torchrun_grpo(model_dir: str, out: Path, strategy: str, steps: int) -> subprocess.CompletedProcess:
    overrides = [f"model.path={model_dir}", "train.method=grpo", "device=cpu", "precision=fp32", f"parallel.strategy={strategy}",
                 "parallel.timeout_s=300", f"data.source={_write_prompts(out / 'prompts.jsonl', 16)}", "data.val_fraction=0",
                 "train.seq_len=48", "train.micro_batch_size=4", "train.grad_accum=2", "grpo.prompts_per_batch=2",
                 "grpo.group_size=4", "grpo.max_tokens=4", "grpo.max_logprob_diff=1e-3", "grpo.eval_problems=0",
                 "grpo.rewards=tests.test_grpo_multirank:first_token_div4=1.0", "grpo.temperature=0.5", "train.lr=1e-2",
                 "lora.rank=8", "train.scheduler=constant", f"train.max_steps={steps}", "engine.num_blocks=64",
                 "checkpoint.every_n_steps=0", "checkpoint.save_final=false", f"output_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_roll_out_their_own_prompts_and_keep_engines_in_sync(strategy, tiny_llama_dir, tmp_path):
    steps = 3
    proc = _torchrun_grpo(tiny_llama_dir, tmp_path, strategy, steps)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # each rank sampled its own prompts: disjoint shares, a new pair of prompts every step
    shares = [set(r["prompts"]) for r in ranks]
    assert not shares[0] & shares[1], shares
    assert all(len(s) == 2 * steps for s in shares), shares

    # the global loss of every step was finite, and every generation passed the engine/trainer parity check
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "loss" in r]
    assert len(steps_logged) == steps and all(math.isfinite(r["loss"]) for r in steps_logged)
    assert all(r["logprob_diff"] < 1e-3 for r in steps_logged)

    # the ranks' policies stayed identical, and training moved them off the base (LoRA B starts at zero)
    assert ranks[0]["policy"].keys() == ranks[1]["policy"].keys() and ranks[0]["policy"]
    for name, weight in ranks[0]["policy"].items():
        assert torch.equal(weight, ranks[1]["policy"][name]), name
    from safetensors.torch import load_file

    base = load_file(Path(tiny_llama_dir) / "model.safetensors")
    assert any(not torch.allclose(w, base[name].float()) for name, w in ranks[0]["policy"].items())

    # every rank's engine holds that policy: it scores a fixed sequence like the trainer, and like the other rank's engine
    for r in ranks:
        assert r["syncs"] == steps + 1  # setup + one per optimizer step
        assert (r["engine_logprobs"] - r["trainer_logprobs"]).abs().max() < 1e-3
    assert torch.allclose(ranks[0]["engine_logprobs"], ranks[1]["engine_logprobs"], atol=1e-5)


if __name__ == "__main__":
    _worker(sys.argv[1:])
