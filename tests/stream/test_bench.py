"""`emotion-monitor bench` end to end: its own local broker, Redis and worker, the shipped model.

Checks the contract of the output (the last line is one JSON object with exactly the documented
keys), not the speed: speed is what the command reports, never asserted by a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from model.config import WEIGHTS_DIR

KEYS = {"encoder_utt_per_s", "pipeline_utt_per_s", "naive_utt_per_s", "latency_p50_ms", "latency_p99_ms",
        "step_ms_ratio_long_short", "device", "encoder_backend",
        # issue 15: the worker's overhead against a passthrough faust worker, and the step path's rate
        "passthrough_msg_per_s", "passthrough_core_ms_per_msg", "worker_overhead_core_ms_per_utt",
        "overhead_vs_passthrough", "path_utt_per_s_b64", "path_utt_per_s_b256",
        # the model's own step per utterance, and the overhead ratio without it
        "path_model_step_ms_per_utt", "overhead_beyond_model_vs_passthrough",
        # the worker with its encoder stubbed out: its overhead measured directly
        "stubbed_worker_utt_per_s", "stubbed_worker_core_ms_per_utt", "stubbed_overhead_vs_passthrough",
        # that ratio's floor with the model's step as it is: the passthrough plus the step alone
        "model_step_floor_vs_passthrough"}
# The figures' presence and arithmetic do not depend on the model: the fast MELD model (MiniLM)
# keeps these runs to half the time the default (MPNet) takes.
FAST_MODEL = WEIGHTS_DIR / "meld-small"
# Differences of two measured figures: may come out negative on a noisy machine.
SIGNED = {"overhead_beyond_model_vs_passthrough"}


@pytest.mark.integration
def test_bench_json_has_exactly_the_documented_figures(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "bench", "--json", "--duration", "2", "--conversations", "8",
                           "--model", str(FAST_MODEL)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == KEYS
    assert result["device"] == "cpu"
    # backend auto on a CPU: int8 for a model that ships its calibration, as meld-small does
    assert result["encoder_backend"] == "onnx-int8"
    for key in KEYS - {"device", "encoder_backend"} - SIGNED:
        assert isinstance(result[key], float) and result[key] > 0, key
    for key in SIGNED:
        assert isinstance(result[key], float), key
    assert result["latency_p50_ms"] <= result["latency_p99_ms"]
    assert "pipeline" in proc.stdout and "naive" in proc.stdout  # the human-readable lines come first
    # Where the CPU went: every process of the pipeline is accounted for.
    cpu_line = next(line for line in proc.stdout.splitlines() if line.startswith("cpu per utterance"))
    for part in ("worker", "broker", "redis", "load generator"):
        assert part in cpu_line
    # The overhead ratio is the two CPU figures divided (rounding aside).
    ratio = result["worker_overhead_core_ms_per_utt"] / result["passthrough_core_ms_per_msg"]
    assert abs(result["overhead_vs_passthrough"] - ratio) <= 0.01 * ratio + 0.002
    rest = (result["worker_overhead_core_ms_per_utt"] - result["path_model_step_ms_per_utt"]) / result["passthrough_core_ms_per_msg"]
    assert abs(result["overhead_beyond_model_vs_passthrough"] - rest) <= 0.01 * abs(rest) + 0.01
    assert any(line.startswith("passthrough") for line in proc.stdout.splitlines())
    stubbed = result["stubbed_worker_core_ms_per_utt"] / result["passthrough_core_ms_per_msg"]
    assert abs(result["stubbed_overhead_vs_passthrough"] - stubbed) <= 0.01 * stubbed + 0.002
    assert any(line.startswith("stubbed") for line in proc.stdout.splitlines())
    floor = 1 + result["path_model_step_ms_per_utt"] / result["passthrough_core_ms_per_msg"]
    assert result["model_step_floor_vs_passthrough"] > 1
    assert abs(result["model_step_floor_vs_passthrough"] - floor) <= 0.01 * floor + 0.002
    assert any(line.startswith("path b256") for line in proc.stdout.splitlines())


@pytest.mark.integration
def test_bench_with_two_workers_splits_the_cores_and_counts_both(tmp_path):
    """--workers 2: two worker processes in one consumer group, one model thread each; every
    utterance still gets its provisional event (the bench raises otherwise) and both workers'
    CPU is counted."""
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "bench", "--json", "--duration", "2", "--conversations", "8",
                           "--workers", "2", "--model", str(FAST_MODEL)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(proc.stdout.strip().splitlines()[-1])) == KEYS
    assert f"2 workers, {max(1, (os.cpu_count() or 1) // 2)} model thread(s) each" in proc.stderr
    cpu_line = next(line for line in proc.stdout.splitlines() if line.startswith("cpu per utterance"))
    assert "worker 1" in cpu_line and "worker 2" in cpu_line


def test_cpu_meter_counts_a_child_process_and_this_one():
    """The bench's CPU figures come from /proc: a child that burns ~0.3 s of CPU must show it."""
    from stream.tools.bench import CpuMeter, cpu_seconds

    if cpu_seconds(1) is None:
        pytest.skip("no /proc here")
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nimport sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        meter = CpuMeter({"child": child.pid, "self": None})
        meter.start()
        deadline = time.time() + 10
        while (cpu_seconds(child.pid) or 0) < 0.3 and time.time() < deadline:
            sum(range(10_000))
        out = meter.stop(utterances=10)
    finally:
        child.communicate(b"", timeout=10)
    assert out["child"] * 10 / 1000 >= 0.25  # core-ms per utterance x utterances = its CPU seconds
    assert out["self"] > 0 and out["wall"] > 0


def test_path_rate_steps_the_stubbed_path_and_reports_its_stages():
    """The step path with the encoder stubbed (state decode, logic + model step, events and alert
    rules, state encode) on a tiny model: a positive rate, every stage timed, and the states it
    starts from are real stored bytes at a full window."""
    import torch

    from model.modeling import EmotionSIModel
    from stream.core.codec import decode_state
    from stream.core.rules import load_rules
    from stream.core.conversation import ConversationConfig
    from stream.tools.pathbench import PATH_STAGES, default_step, path_rate, prepared_states
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = EmotionSIModel(tiny_config(lookahead=2, window=4)).eval()
    rules = load_rules(None, model.cfg.emotion_labels)
    r = path_rate(model, 8, rules=rules, seconds=0.05, min_repeats=2)
    assert r.batch == 8 and r.repeats >= 2
    assert r.utt_per_s > 0 and r.ms_per_batch > 0
    assert set(r.stages_ms) == set(PATH_STAGES) and all(v >= 0 for v in r.stages_ms.values())
    assert r.stages_ms["model_step"] > 0
    assert abs(sum(r.stages_ms.values()) - r.ms_per_batch) <= 0.25 * r.ms_per_batch  # the stages are the batch

    import numpy as np

    cfg = ConversationConfig(model.cfg.emotion_labels, "t@0", model.cfg.window, False, rules)
    blobs = prepared_states(cfg, default_step(model), model.encoder.dim, 3, 6, np.random.default_rng(0))
    states = [decode_state(b) for b in blobs.values()]
    assert len(states) == 3 and all(s.last_seq == 5 and s.dialogue.seen == 6 for s in states)
    assert all(len(s.dialogue.vectors) == model.cfg.window for s in states)  # bounded window, full


def test_the_stub_encoder_gives_each_text_one_fixed_unit_vector():
    """stream.tools.stubworker: the bench's stubbed-out encoder (the real worker's encoder replaced
    by a lookup): same text -> same vector, the model's width, unit length, no tokenizer."""
    import numpy as np

    from stream.tools.stubworker import stub_encoder

    encode = stub_encoder(48)
    a = encode(["hello", "bye", "hello"])
    assert a.shape == (3, 48) and a.dtype == np.float32
    assert np.array_equal(a[0], a[2]) and not np.array_equal(a[0], a[1])
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert encode([]).shape == (0, 48)
    assert np.array_equal(stub_encoder(48)(["bye"])[0], a[1])  # the same in every process
