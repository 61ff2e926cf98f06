"""The decode-path timeline (engine/kernels/timeline.py): which launches it claims rows for, and how it
turns per-program stamps into a stage-by-stage critical path (the kernels' stamps themselves run on a GPU
only; tests/test_gpu_kernels_compile.py checks where they sit in the compiled kernels)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine.kernels import timeline  # noqa: E402


def test_claims_only_the_recorded_batch_size_and_only_while_recording():
    record = timeline.Timeline(torch.device("cpu"), batch=1, capacity=64)
    fallback = torch.empty(1)
    assert timeline.claim("gemv 8x8", 4, 1, fallback) == (fallback, False)  # not recording yet
    timeline.recording(record)
    try:
        rows, on = timeline.claim("gemv 8x8", 4, 1, fallback)
        assert on and rows.shape == (4, 8)
        assert timeline.claim("gemv 8x8", 4, 2, fallback) == (fallback, False)  # a batch-2 graph's launch
        timeline.claim("attention", 8, 1, fallback)
        with pytest.raises(RuntimeError, match="full"):
            timeline.claim("gemv 8x8", 64, 1, fallback)
    finally:
        timeline.recording(None)
    assert [(launch.label, launch.programs, launch.offset) for launch in record.launches] == [("gemv 8x8", 4, 0), ("attention", 8, 4)]


def test_spans_and_stage_costs_follow_the_critical_path():
    record = timeline.Timeline(torch.device("cpu"), capacity=16)
    timeline.recording(record)
    try:
        gemv, _ = timeline.claim("gemv", 2, 1, torch.empty(1))
        unreplayed, _ = timeline.claim("eager warm-up", 2, 1, torch.empty(1))  # stays zero: left out
        attention, _ = timeline.claim("attention", 2, 1, torch.empty(1))
    finally:
        timeline.recording(None)
    t = 1_000_000  # ns; rows: start, released, end, SM
    gemv[:, :4] = torch.tensor([[t, t + 500, t + 3000, 0], [t + 100, t + 600, t + 4000, 1]])
    # program 0 works (one marked point, after the attention proper); program 1 is an idle split that
    # started late and marked nothing
    attention[:, :4] = torch.tensor([[t + 1000, t + 4800, t + 6500, 2], [t + 3000, t + 4900, t + 5000, 2]])
    attention[0, 4] = t + 5200
    spans = record.spans()
    assert [s["label"] for s in spans] == ["gemv", "attention"]
    assert spans[1] == {"label": "attention", "programs": 2, "first_start": 1000, "last_start": 3000, "first_release": 4800,
                        "last_release": 4900, "last_end": 6500, "sms": 1, "last_marks": [5200, None, None, None],
                        "marked_last_start": 1000}
    (cost,) = timeline.stage_costs(spans)
    # the attention ended 2.5 us after the GEMV's last program; it was released 0.8 us after that end; its
    # last program was resident 1 us before that end, its working one 3 us; its work after release took 1.7 us
    assert cost == {"label": "attention", "programs": 2, "stage": 2.5, "release": 0.8, "tail": 1.7, "lead": 1.0,
                    "lead_marked": 3.0, "marks": [0.4, None, None, None]}
