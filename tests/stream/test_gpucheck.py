"""stream.tools.gpucheck's device-agnostic parts on the CPU (the script itself needs CUDA; see deploy/gpu-check.sh)."""

from __future__ import annotations

import torch

from stream.tools.gpucheck import path_vs_encoder, stubbed_path
from model.modeling import EmotionSIModel
from tests.conftest import tiny_config


def test_stubbed_path_rates_and_their_ratio_to_the_encoder():
    torch.manual_seed(0)
    model = EmotionSIModel(tiny_config(lookahead=2, window=4)).eval()
    stub = stubbed_path(model, batches=(4, 8), seconds=0.05)
    assert set(stub) == {4, 8}
    for r in stub.values():
        assert r["utt_per_s"] > 0 and r["ms_per_batch"] > 0
        assert set(r["stages_ms"]) == {"decode", "model_step", "events", "encode"}
    rows = [{"backend": "eager", "batch": 8, "utt_per_s": 100.0}, {"backend": "compile", "batch": 8, "utt_per_s": 400.0},
            {"backend": "compile", "batch": 4, "utt_per_s": 1.0}]
    ratio, versus = path_vs_encoder(stub, rows, batch=8)
    assert versus == "compile" and abs(ratio - stub[8]["utt_per_s"] / 400.0) < 1e-3
    ratio, versus = path_vs_encoder(stub, [r for r in rows if r["backend"] == "eager"], batch=8)
    assert versus == "eager"  # no compile row: the fastest measured
    assert path_vs_encoder(stub, rows, batch=256) == (None, None)
