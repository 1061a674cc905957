"""`emotion-monitor soak --faults`, short: pauses inside calls longer than the idle timeout, worker
SIGKILLs, a Redis restart and injected invalid messages; nothing valid lost, no duplicate final id,
dead letters only for what it injected. (The 10-minute run: docs/reliability.md.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]


def test_short_fault_soak_loses_nothing(tiny_artifact, tmp_path):
    env = {**os.environ, "EMOTION_MONITOR_MODEL_PATH": str(tiny_artifact), "EMOTION_MONITOR_DEVICE": "cpu",
           "EMOTION_MONITOR_IDLE_FINALIZE_S": "2", "EMOTION_MONITOR_ABANDON_AFTER_S": "120",
           "EMOTION_MONITOR_PARTITIONS": "3"}
    argv = [sys.executable, "-m", "stream.cli", "soak", "--faults", "--json", "--duration", "40", "--conversations", "8",
            "--rate", "8", "--turns", "10", "--max-pause", "6", "--pause-prob", "0.25", "--kill-every", "15",
            "--redis-restart-at", "22", "--invalid-every", "15", "--workers", "2", "--drain", "120"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert done.stdout.strip(), done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    detail = json.dumps(result) + "\n" + done.stderr[-3000:]
    assert result["utterances_in"] >= 150 and result["utterances_with_a_final"] == result["utterances_in"], detail
    assert result["lost"] == 0 and result["duplicate_final_ids"] == 0, detail
    assert result["dlq_unexpected"] == 0 and result["dlq_injected_seen"] == result["dlq_injected_sent"] >= 10, detail
    assert result["worker_kills"] >= 2 and result["redis_restarts"] == 1 and result["pauses"] >= 5, detail
    assert result["longest_pause_s"] > 2  # longer than the idle timeout: flushes happened
    assert done.returncode == 0, detail
