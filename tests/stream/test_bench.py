"""`emotion-monitor bench` end to end: its own local broker, Redis and worker, the shipped model.

Checks the contract of the output (the last line is one JSON object with exactly the documented
keys), not the speed: speed is what the command reports, never asserted by a test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

KEYS = {"encoder_utt_per_s", "pipeline_utt_per_s", "naive_utt_per_s", "latency_p50_ms", "latency_p99_ms",
        "step_ms_ratio_long_short", "device"}


def test_bench_json_has_exactly_the_documented_figures(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "bench", "--json", "--duration", "2", "--conversations", "8"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == KEYS
    assert result["device"] == "cpu"
    for key in KEYS - {"device"}:
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["latency_p50_ms"] <= result["latency_p99_ms"]
    assert "pipeline" in proc.stdout and "naive" in proc.stdout  # the human-readable lines come first
