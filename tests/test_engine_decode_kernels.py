"""The kernels that end a CUDA-graph decode step — the greedy argmax (engine/kernels/argmax.py) and the
device-side advance that chains steps (engine/kernels/decode_advance.py) — run on CPU through the
Triton interpreter (each check in a fresh process: the interpreter is chosen at import)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def check_argmax() -> None:
    import torch

    from engine.kernels.argmax import CHUNK, Argmax

    vocab = 2 * CHUNK + 37  # a partial last chunk
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, vocab, generator=g)
    logits[1, 7] = logits[1, CHUNK + 3] = logits[1, 2 * CHUNK + 5] = 50.0  # ties across chunks: the first wins
    logits[2, 100] = logits[2, 101] = 60.0  # ties inside a chunk
    logits[3] = float("-inf")
    logits[3, vocab - 1] = 0.0  # the maximum in the partial chunk
    logits[4, :] = 1.0  # all equal: index 0
    argmax = Argmax(8, vocab, logits.device)
    out = torch.full((5,), -1, dtype=torch.long)
    assert argmax(logits, out).tolist() == logits.argmax(-1).tolist() == [logits[0].argmax().item(), 7, 100, vocab - 1, 0]
    out3 = torch.full((3,), -1, dtype=torch.long)
    assert argmax(logits[2:], out3).tolist() == [100, vocab - 1, 0]  # a row slice, as a graph's bucket is


def check_advance() -> None:
    import torch

    from engine.kernels.decode_advance import advance_decode_inputs

    block_size, width = 4, 3
    # rows: live mid-block | live at a block's last slot | padding | dry run (no slot, has context) | at its table's end
    ids = torch.tensor([5, 6, 0, 9, 7])
    pos = torch.tensor([1, 3, 0, 6, 11])
    tables = torch.tensor([[10, 11, 12], [20, 21, 22], [0, 0, 0], [0, 0, 0], [30, 31, 32]])
    slots = torch.tensor([10 * 4 + 1, 20 * 4 + 3, -1, -1, 32 * 4 + 3])
    lens = torch.tensor([2, 4, 0, 7, 12])
    hist = torch.full((2, 8), -7)
    counter = torch.zeros(1, dtype=torch.long)
    tokens = torch.tensor([100, 101, 102, 103, 104])
    advance_decode_inputs(ids, pos, slots, lens, tables, tokens, hist, counter, block_size)
    assert counter.tolist() == [1]
    assert hist[0, :5].tolist() == tokens.tolist() and hist[0, 5:].tolist() == [-7] * 3 and hist[1].tolist() == [-7] * 8
    assert ids.tolist() == [100, 101, 0, 9, 7]
    assert pos.tolist() == [2, 4, 0, 6, 11]
    assert lens.tolist() == [3, 5, 0, 7, 12]
    assert slots.tolist() == [10 * 4 + 2, 21 * 4 + 0, -1, -1, 32 * 4 + 3]  # row 1 crossed into its next block
    # the next step, then replays past the history's depth keep writing its last row
    for step, new in enumerate(([200, 201, 202, 203, 204], [300, 301, 302, 303, 304]), start=1):
        advance_decode_inputs(ids, pos, slots, lens, tables, torch.tensor(new), hist, counter, block_size)
        assert hist[1, :5].tolist() == new and counter.tolist() == [step + 1]
    assert hist[0, :5].tolist() == tokens.tolist()
    assert pos.tolist() == [4, 6, 0, 6, 11] and ids.tolist() == [300, 301, 0, 9, 7]
    assert slots.tolist() == [11 * 4 + 0, 21 * 4 + 2, -1, -1, 32 * 4 + 3]


CHECKS = {"argmax": check_argmax, "advance": check_advance}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_decode_graph_kernel(check):
    """argmax: torch's first-maximum index for every row (ties within and across chunks, -inf rows);
    advance: live rows move to their next position and slot, padding and dry-run rows stay put."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, __file__, check], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    CHECKS[sys.argv[1]]()
