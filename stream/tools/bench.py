"""`emotion-monitor bench`: the worker's speed, measured side by side in one run.

Figures (same utterances, same model, same machine, one run, since this machine is noisy):
  encoder_utt_per_s        the bare encoder in batches (the ceiling)
  pipeline_utt_per_s       sustained through the broker, the worker and Redis (utterances -> provisional events)
  naive_utt_per_s          a naive consumer scoring each message alone (same encoder, batch of 1, no context)
  latency_p50_ms / p99     produce -> provisional event seen by a consumer, at half the sustained rate
  step_ms_ratio_long_short per-utterance cost (state load + step + events + alert rules + state save,
                           encoder excluded) at position 200 of a conversation over position 5,
                           the two positions timed alternately
  device, encoder_backend  where the model ran and the encoder backend served (backend auto on a CPU:
                           onnx-int8 for a model that ships its calibration, else onnx)
  passthrough_core_ms_per_msg   CPU per message of a passthrough faust worker (stream/tools/passthrough.py:
                           same settings and micro-batching, validation, one event of a real event's
                           size per utterance; no model, no Redis) under the same load: the floor
  passthrough_msg_per_s    its sustained rate (first produce -> last event received)
  worker_overhead_core_ms_per_utt  the worker's CPU per utterance minus the bare encoder's
  overhead_vs_passthrough  worker_overhead_core_ms_per_utt / passthrough_core_ms_per_msg
  path_utt_per_s_b64 / _b256  the step path with the encoder stubbed out (state decode, logic and
                           model step, events and alert rules, state encode; stream/tools/pathbench.py),
                           one utterance each for 64 / 256 conversations, in this process
  path_model_step_ms_per_utt  of that path at 64 conversations, the model's own step (model.streaming.step)
                           per utterance: part of the worker's figure above that no stream-side change removes
  overhead_beyond_model_vs_passthrough  (worker_overhead_core_ms_per_utt - path_model_step_ms_per_utt)
                           / passthrough_core_ms_per_msg: what the stream side adds, against the same floor
  stubbed_worker_utt_per_s the real worker with its encoder stubbed out (stream/tools/stubworker.py:
                           a fixed vector per text; Redis, the model's step, events, rules all real)
                           under the passthrough's load: one worker's rate when the encoder is free
  stubbed_worker_core_ms_per_utt  its CPU per utterance: the worker's overhead beyond its encoder,
                           measured directly (worker_overhead_core_ms_per_utt is the same quantity
                           as a difference of two large figures, which this machine's noise moves a lot)
  stubbed_overhead_vs_passthrough  stubbed_worker_core_ms_per_utt / passthrough_core_ms_per_msg
  model_step_floor_vs_passthrough  (passthrough_core_ms_per_msg + path_model_step_ms_per_utt)
                           / passthrough_core_ms_per_msg: the lowest stubbed_overhead_vs_passthrough a
                           worker could reach with the network as it is, were its Redis state, events and
                           rules free (it still does the passthrough's Kafka I/O and the model's step)
Before the JSON line it prints where the CPU went during the sustained phase (core-ms per
utterance for the worker, the broker, Redis and the bench's own load generator and consumer,
from /proc) and the rate the machine's cores allow at that cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from stream.settings import Settings
from stream.tools.load import interleaved_calls, produce, sample_texts
from stream.tools.localrun import LocalWorker


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure encoder, pipeline and naive throughput, latency and per-utterance cost",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per measured phase, roughly (default 20)")
    p.add_argument("--conversations", type=int, default=32, help="concurrent conversations in the load (default 32)")
    p.add_argument("--model", type=Path, default=None, help="artifact folder (default: model/weights/meld-mpnet, the default MELD model)")
    p.add_argument("--device", default="cpu", help="torch device for the in-process phases and the worker (default cpu)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes in one consumer group for the pipeline phase (default 1); with more than one, "
                        "each gets cores / workers model threads unless EMOTION_MONITOR_TORCH_THREADS says otherwise")
    p.set_defaults(func=run_bench)


# ---- where the CPU goes -------------------------------------------------------------------
def cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux /proc; None elsewhere)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU used by each named process between `start()` and `stop()`, in core-ms per utterance.

    Why: on a small machine the broker, Redis and the load generator share the cores with the
    worker's encoder, so the pipeline's ceiling is the machine's cores divided by the CPU that
    every part spends per utterance, not the bare encoder's rate. Printing it makes that bound
    a measured figure."""

    def __init__(self, pids: dict[str, int | None]):
        self.pids, self.before, self.t0 = pids, {}, 0.0

    def start(self) -> None:
        self.before, self.t0 = {n: cpu_seconds(p) for n, p in self.pids.items()}, time.perf_counter()

    def stop(self, utterances: int) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        out = {}
        for name, pid in self.pids.items():
            now, then = cpu_seconds(pid), self.before.get(name)
            if now is not None and then is not None:
                out[name] = (now - then) * 1000 / utterances
        out["wall"] = wall * 1000 / utterances
        return out


# ---- in-process phases -------------------------------------------------------------------
def encoder_rate(scorer, seconds: float, batch: int) -> tuple[float, float | None]:
    """(utterances per second, CPU core-ms per utterance) of the bare encoder."""
    texts = sample_texts()
    scorer.encode(texts[:batch])  # warm-up
    n, t0, cpu0 = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - t0 < seconds:
        chunk = random.sample(texts, min(batch, len(texts)))
        scorer.encode(chunk)
        n += len(chunk)
    rate = n / (time.perf_counter() - t0)
    return rate, (cpu_seconds() - cpu0) * 1000 / n


def step_cost_ratio(scorer, rules_path: str | None = None, repeats: int = 60) -> tuple[float, float]:
    """Median ms per utterance at positions 5 and 200 (state bytes in, step, events, alert rules,
    state bytes out): the worker's per-utterance path without the encoder."""
    from stream.core.codec import decode_state, encode_state
    from stream.core.conversation import ConversationConfig, ConversationState, advance_conversations
    from stream.core.rules import load_rules
    from stream.core.validate import UtteranceMessage

    cfg = ConversationConfig(scorer.labels, scorer.model_id, scorer.window, False, load_rules(rules_path, scorer.labels))
    roles = ("customer", "agent")
    dim = scorer.encode([]).shape[1]  # the utterance vector's size
    rng = np.random.default_rng(0)
    conv: ConversationState | None = None
    snapshots: dict[int, bytes] = {}
    for seq in range(201):
        item = UtteranceMessage("ratio", seq, f"s{seq % 2}", roles[seq % 2], "x", None, f"d{seq}")
        convs, _ = advance_conversations(cfg, scorer.step, {"ratio": conv}, [item], rng.standard_normal((1, dim)).astype(np.float32), 0.0)
        conv = convs["ratio"]
        if seq + 1 in (5, 200):
            snapshots[seq + 1] = encode_state(conv)
    times: dict[int, list[float]] = {pos: [] for pos in snapshots}
    vec = rng.standard_normal((1, dim)).astype(np.float32)
    for _ in range(repeats):
        for pos, blob in snapshots.items():  # alternating, so the machine's drift hits both alike
            t0 = time.perf_counter()
            state = decode_state(blob)
            convs, _ = advance_conversations(cfg, scorer.step, {"ratio": state}, [UtteranceMessage("ratio", pos, f"s{pos % 2}", roles[pos % 2], "x", None, "dx")], vec, 0.0)
            encode_state(convs["ratio"])
            times[pos].append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[5]), statistics.median(times[200])


async def naive_rate(scorer, bootstrap: str, n: int, n_conv: int) -> float:
    """What people write first: consume, score each message alone, produce, next. Each message is
    encoded in a batch of one and stepped from a fresh dialogue state (a window of one, no context)."""
    from model.streaming import DialogueState
    from stream import kafka

    src, dst = f"naive-in-{uuid.uuid4().hex[:6]}", f"naive-out-{uuid.uuid4().hex[:6]}"
    await kafka.create_topics(bootstrap, {src: 4, dst: 4})
    await produce(bootstrap, src, interleaved_calls(n_conv, n))
    consumer = kafka.consumer(src, bootstrap=bootstrap, fetch_max_wait_ms=10)
    producer = kafka.producer(bootstrap)
    await consumer.start()
    await producer.start()
    done, t0 = 0, None
    try:
        async for rec in consumer:
            t0 = t0 or time.perf_counter()
            msg = json.loads(rec.value)
            _, scored = scorer.step([DialogueState()], scorer.encode([msg["text"]]), [msg["speaker"]])
            event = {"conversation_id": msg["conversation_id"], "seq": msg["seq"],
                     "scores": dict(zip(scorer.labels, scored[0][0].probs.tolist()))}
            await producer.send_and_wait(dst, json.dumps(event).encode(), key=rec.key)
            done += 1
            if done >= n:
                break
    finally:
        await consumer.stop()
        await producer.stop()
    return n / (time.perf_counter() - t0)


async def _await_provisional(consumer, ids: set[tuple[str, int]], timeout_s: float) -> dict[tuple[str, int], float]:
    """Receive time of the provisional event of each (conversation, seq) in `ids` (latency = that - ts_produced)."""
    got: dict[tuple[str, int], float] = {}
    deadline = time.time() + timeout_s
    while len(got) < len(ids) and time.time() < deadline:
        batch = await consumer.getmany(timeout_ms=200)
        now = time.time()
        for records in batch.values():
            for r in records:
                e = json.loads(r.value)
                key = (e["conversation_id"], e["seq"])
                if e["status"] == "provisional" and key in ids:
                    got[key] = now - e["ts_produced"]
    return got


async def pipeline_phase(settings: Settings, stack, workers, n_conv: int, sustained_n: int, latency_seconds: float,
                         progress) -> tuple[float, list[float], dict[str, float]]:
    from stream import kafka
    from stream.tools.localrun import wait_until_ready

    consumer = kafka.consumer(settings.emotions_topic, bootstrap=stack.bootstrap, fetch_max_wait_ms=10)
    await consumer.start()
    try:
        worker = workers[0]
        await wait_until_ready(stack.bootstrap, settings.utterances_topic, consumer, worker)
        progress("pipeline: sustained load")
        load = interleaved_calls(n_conv, sustained_n)
        ids = {(m["conversation_id"], m["seq"]) for m in load}
        names = ["worker"] if len(workers) == 1 else [f"worker {k + 1}" for k in range(len(workers))]
        meter = CpuMeter({**{n: w.proc.pid for n, w in zip(names, workers)}, "broker": stack.broker_pid,
                          "redis": stack.redis_pid, "load generator and event consumer": None})
        meter.start()
        t0 = time.time()
        sender = asyncio.create_task(produce(stack.bootstrap, settings.utterances_topic, load))
        got = await _await_provisional(consumer, ids, timeout_s=600)
        await sender
        cpu = meter.stop(len(ids))
        if len(got) < len(ids):
            raise RuntimeError(f"pipeline: only {len(got)} of {len(ids)} provisional events arrived; see {worker.log}")
        elapsed = max(t0 + lat for lat in got.values()) - t0  # first produce -> last provisional received
        rate = len(ids) / elapsed
        progress(f"pipeline: {rate:.0f} utt/s; latency at {rate / 2:.0f} utt/s")
        lat_load = interleaved_calls(n_conv, max(50, int(rate / 2 * latency_seconds)), seed=11)
        ids = {(m["conversation_id"], m["seq"]) for m in lat_load}
        sender = asyncio.create_task(produce(stack.bootstrap, settings.utterances_topic, lat_load, rate=rate / 2))
        got = await _await_provisional(consumer, ids, timeout_s=latency_seconds * 4 + 60)
        await sender
        return rate, [v * 1000 for v in got.values()], cpu
    finally:
        await consumer.stop()


def side_env(stack, name: str, tag: str, **settings) -> dict[str, str]:
    """The worker's environment (same settings, same group timeouts) with a side phase's own
    consumer group, topics and state prefix, so it never reads the worker's input or writes its output."""
    from stream.tools.localrun import local_worker_env

    return local_worker_env(stack, app_id=f"{name}-{tag}", utterances_topic=f"{name}-in-{tag}",
                            emotions_topic=f"{name}-out-{tag}", **settings)


# The two processes measured beside the worker, under the sustained load's shape: the floor
# (Kafka I/O alone) and the worker with its encoder stubbed out (its own overhead, directly).
SIDE_PHASES = {
    "passthrough": ("stream.tools.passthrough",),
    "stubbed": ("stream.tools.stubworker",),
}


async def side_phase(name: str, stack, n_conv: int, n: int, progress, workdir: Path,
                     **settings) -> tuple[float, float | None]:
    """(utterances per second, core-ms per utterance of the process) of a SIDE_PHASES process
    under the sustained load's shape: n utterances over n_conv conversations, produced as fast
    as the producer goes, until every one's provisional event is back."""
    from stream import kafka
    from stream.tools.localrun import wait_until_ready

    tag = uuid.uuid4().hex[:6]
    env = side_env(stack, name, tag, **settings)
    src, dst = env["EMOTION_MONITOR_UTTERANCES_TOPIC"], env["EMOTION_MONITOR_EMOTIONS_TOPIC"]
    partitions = Settings().partitions
    await kafka.create_topics(stack.bootstrap, {src: partitions, dst: partitions})
    proc = LocalWorker(env, workdir / f"{name}.log", module=SIDE_PHASES[name])
    consumer = kafka.consumer(dst, bootstrap=stack.bootstrap, fetch_max_wait_ms=10)
    await consumer.start()
    try:
        await wait_until_ready(stack.bootstrap, src, consumer, proc)
        progress(f"{name}: sustained load")
        load = interleaved_calls(n_conv, n, seed=13)
        ids = {(m["conversation_id"], m["seq"]) for m in load}
        meter = CpuMeter({name: proc.proc.pid})
        meter.start()
        t0 = time.time()
        sender = asyncio.create_task(produce(stack.bootstrap, src, load))
        got = await _await_provisional(consumer, ids, timeout_s=300)
        await sender
        cpu = meter.stop(len(ids))
        if len(got) < len(ids):
            raise RuntimeError(f"{name}: only {len(got)} of {len(ids)} events arrived; see {proc.log}")
        rate = len(ids) / (max(t0 + lat for lat in got.values()) - t0)
        return rate, cpu.get(name)
    finally:
        await consumer.stop()
        proc.stop()


def path_rates(scorer, rules_path, batches=(64, 256), seconds: float = 1.0) -> dict:
    """The step path's rate with the encoder stubbed out (stream/tools/pathbench.py), per batch size,
    with the worker's own model step (scorer.step) and alert rules."""
    from stream.core.rules import load_rules
    from stream.tools.pathbench import path_rate

    rules = load_rules(rules_path, scorer.labels)
    return {b: path_rate(scorer.model, b, labels=scorer.labels, model_id=scorer.model_id, rules=rules,
                         model_step=scorer.step, seconds=seconds) for b in batches}


def run_bench(args) -> int:
    return asyncio.run(_bench(args))


async def _bench(args) -> int:
    from rich.console import Console

    from model.scorer import Scorer

    console = Console(stderr=True)

    def progress(msg: str) -> None:
        console.print(f"[dim]bench:[/] {msg}")

    if args.workers < 1:
        raise SystemExit("bench: --workers must be 1 or more")
    settings = Settings()
    # Built like the worker's (backend, batch size, token budget): the three rates use one encoder.
    scorer = Scorer(args.model or settings.model_path, args.device, settings.backend, settings.max_batch,
                    settings.max_batch_tokens)
    progress(f"model {scorer.model_id} on {scorer.device}, encoder backend {scorer.backend}")
    phase = max(2.0, args.duration / 4)
    m = in_process_figures(scorer, settings, phase, progress)
    m.update(await local_stack_figures(args, settings, scorer, phase, m["enc"], progress))
    print_figures(m, args.workers, args.conversations, settings.max_batch)
    if args.json:
        print(json.dumps(bench_result(m, scorer)))
    return 0


def in_process_figures(scorer, settings: Settings, phase: float, progress) -> dict:
    """The phases without a broker: the bare encoder, the step cost by position, the step path."""
    progress(f"encoder in batches of {settings.max_batch} for {phase:.0f} s")
    enc, enc_cpu = encoder_rate(scorer, phase, settings.max_batch)
    progress(f"encoder: {enc:.0f} utt/s; per-utterance cost at positions 5 and 200")
    short_ms, long_ms = step_cost_ratio(scorer, settings.rules_path)
    progress("step path with the encoder stubbed out, batches of 64 and 256")
    paths = path_rates(scorer, settings.rules_path, (64, 256), seconds=max(1.0, phase / 2))
    return {"enc": enc, "enc_cpu": enc_cpu, "short_ms": short_ms, "long_ms": long_ms, "paths": paths}


async def local_stack_figures(args, settings: Settings, scorer, phase: float, enc: float, progress) -> dict:
    """The phases through the local broker: the workers' pipeline, the passthrough, the naive consumer."""
    from stream.tools.localrun import local_topics, local_worker_env, wait_all_assigned
    from stream.tools.localstack import local_stack

    workdir = Path(tempfile.mkdtemp(prefix="emotion-monitor-bench-"))
    with local_stack(local_topics(settings), workdir=workdir) as stack:
        # Several workers: one model thread pool per process, the cores split between them (Python
        # runs one thread at a time per process, so a second process keeps a core busy while the
        # first is in its event loop).
        threads = settings.torch_threads or (max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else None)
        workers = [LocalWorker(local_worker_env(stack, model_path=args.model, device=args.device, torch_threads=threads),
                               workdir / f"worker-{k + 1}.log") for k in range(args.workers)]
        try:
            if len(workers) > 1:
                progress(f"{len(workers)} workers, {threads} model thread(s) each: waiting for every one to hold partitions")
                await wait_all_assigned(workers)
            sustained_n = max(200, int(enc * args.duration / 2))
            pipe, latencies, cpu = await pipeline_phase(settings, stack, workers, args.conversations, sustained_n, phase,
                                                        progress)
        finally:
            for w in workers:
                w.stop()
        # The side phases run far faster than the worker: more utterances, so each lasts seconds.
        side_n = max(sustained_n, int(500 * args.duration))
        progress("worker with its encoder stubbed out (everything else real)")
        # eager: no ONNX export at start-up (the stub replaces the encoder whatever the backend)
        stub_rate, stub_cpu = await side_phase("stubbed", stack, args.conversations, side_n, progress, workdir,
                                               model_path=args.model, device=args.device, backend="eager",
                                               torch_threads=settings.torch_threads or None)
        progress("passthrough worker (faust, validation, one event per utterance; no model, no Redis)")
        pt_rate, pt_cpu = await side_phase("passthrough", stack, args.conversations, side_n, progress, workdir,
                                           model_path=args.model)
        progress("naive consumer")
        naive = await naive_rate(scorer, stack.bootstrap, max(100, int(pipe * phase / 4)), args.conversations)
    return {"pipe": pipe, "latencies": latencies, "cpu": cpu, "pt_rate": pt_rate, "pt_cpu": pt_cpu, "naive": naive,
            "stub_rate": stub_rate, "stub_cpu": stub_cpu}


def bench_result(m: dict, scorer) -> dict:
    """The JSON line (the figures of the module docstring)."""
    p50, p99 = np.percentile(m["latencies"], [50, 99])
    overhead = worker_overhead(m["cpu"], m["enc_cpu"])
    step = model_step_ms(m["paths"][64])
    return {
        "encoder_utt_per_s": round(m["enc"], 1),
        "pipeline_utt_per_s": round(m["pipe"], 1),
        "naive_utt_per_s": round(m["naive"], 1),
        "latency_p50_ms": round(float(p50), 1),
        "latency_p99_ms": round(float(p99), 1),
        "step_ms_ratio_long_short": round(m["long_ms"] / m["short_ms"], 3),
        "device": str(scorer.device),
        "encoder_backend": scorer.backend,
        "passthrough_msg_per_s": round(m["pt_rate"], 1),
        "passthrough_core_ms_per_msg": _round(m["pt_cpu"], 3),
        "worker_overhead_core_ms_per_utt": _round(overhead, 3),
        "overhead_vs_passthrough": _round(overhead / m["pt_cpu"] if overhead is not None and m["pt_cpu"] else None, 3),
        "path_utt_per_s_b64": round(m["paths"][64].utt_per_s, 1),
        "path_utt_per_s_b256": round(m["paths"][256].utt_per_s, 1),
        "path_model_step_ms_per_utt": round(step, 3),
        "overhead_beyond_model_vs_passthrough": _round((overhead - step) / m["pt_cpu"]
                                                       if overhead is not None and m["pt_cpu"] else None, 3),
        "stubbed_worker_utt_per_s": round(m["stub_rate"], 1),
        "stubbed_worker_core_ms_per_utt": _round(m["stub_cpu"], 3),
        "stubbed_overhead_vs_passthrough": _round(m["stub_cpu"] / m["pt_cpu"] if m["stub_cpu"] is not None and m["pt_cpu"] else None, 3),
        "model_step_floor_vs_passthrough": _round((m["pt_cpu"] + step) / m["pt_cpu"] if m["pt_cpu"] else None, 3),
    }


def print_figures(m: dict, workers: int, conversations: int, max_batch: int) -> None:
    from stream.tools.pathbench import format_stages

    enc, pipe, naive = m["enc"], m["pipe"], m["naive"]
    p50, p99 = np.percentile(m["latencies"], [50, 99])
    print(f"encoder   {enc:8.1f} utt/s  (bare encoder, batches of {max_batch})")
    print(f"pipeline  {pipe:8.1f} utt/s  ({pipe / enc:.2f} x encoder; broker + {workers} worker(s) + Redis, "
          f"{conversations} conversations)")
    print(f"naive     {naive:8.1f} utt/s  (pipeline is {pipe / naive:.2f} x naive)")
    print(f"latency   p50 {p50:.1f} ms, p99 {p99:.1f} ms  (produce -> provisional event, at {pipe / 2:.0f} utt/s)")
    print(f"step cost {m['short_ms']:.2f} ms at position 5, {m['long_ms']:.2f} ms at 200: "
          f"ratio {m['long_ms'] / m['short_ms']:.3f}")
    print_cpu(m["cpu"], m["enc_cpu"], pipe)
    print_overhead(worker_overhead(m["cpu"], m["enc_cpu"]), m["pt_cpu"], m["pt_rate"], model_step_ms(m["paths"][64]))
    print_stubbed(m["stub_rate"], m["stub_cpu"], m["pt_cpu"], model_step_ms(m["paths"][64]))
    for b, r in m["paths"].items():
        print(f"path b{b:<4} {r.utt_per_s:8.1f} utt/s  (encoder stubbed: {r.ms_per_batch:.1f} ms per batch of {b}; "
              f"ms per batch: {format_stages(r)}; {r.utt_per_s / enc:.2f} x encoder)")


def print_cpu(cpu: dict[str, float], encoder_cpu_ms: float | None, pipe: float) -> None:
    """Where the CPU went during the sustained load, and the rate the machine's cores allow."""
    cores = os.cpu_count() or 1
    parts = {k: v for k, v in cpu.items() if k != "wall"}
    if not parts or encoder_cpu_ms is None:
        return
    total = sum(parts.values())
    print("cpu per utterance during the sustained load (core-ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
          + f"; all {total:.2f} = {total / cpu['wall'] / cores:.0%} of {cores} cores")
    in_workers = sum(v for k, v in parts.items() if k.startswith("worker"))
    others = total - in_workers
    worker_rest = in_workers - encoder_cpu_ms
    print(f"  bare encoder {encoder_cpu_ms:.2f} core-ms/utt; workers beyond it {worker_rest:.2f}; outside the workers {others:.2f}")
    print(f"  the cores allow {cores * 1000 / total:.0f} utt/s at this CPU per utterance, all of them 100% busy "
          f"(measured {pipe:.0f})")


def worker_overhead(cpu: dict[str, float], encoder_cpu_ms: float | None) -> float | None:
    """The workers' CPU per utterance beyond the bare encoder's (core-ms), from the sustained phase."""
    in_workers = [v for k, v in cpu.items() if k.startswith("worker")]
    if not in_workers or encoder_cpu_ms is None:
        return None
    return sum(in_workers) - encoder_cpu_ms


def model_step_ms(path) -> float:
    """The model's own step (model.streaming.step) per utterance in the step path (single-threaded
    in this process, so its wall time is its CPU time)."""
    return path.stages_ms["model_step"] / path.batch


def print_overhead(overhead: float | None, passthrough_cpu_ms: float | None, passthrough_rate: float,
                   model_step_ms_per_utt: float | None = None) -> None:
    """The worker's own work beyond the encoder against what Kafka I/O alone costs a faust worker."""
    pt = "n/a" if passthrough_cpu_ms is None else f"{passthrough_cpu_ms:.2f} core-ms/msg"
    print(f"passthrough {passthrough_rate:8.1f} msg/s  ({pt}; faust + validation + one event per utterance, "
          "no model, no Redis)")
    if overhead is not None and passthrough_cpu_ms:
        print(f"  worker beyond the encoder {overhead:.2f} core-ms/utt = {overhead / passthrough_cpu_ms:.2f} x passthrough "
              "(target <= 2.0)")
        if model_step_ms_per_utt is not None:
            rest = overhead - model_step_ms_per_utt
            print(f"  of which the model's step ~{model_step_ms_per_utt:.2f} (step path, 64 conversations); the rest "
                  f"{rest:.2f} core-ms/utt = {rest / passthrough_cpu_ms:.2f} x passthrough")


def print_stubbed(rate: float, cpu_ms: float | None, passthrough_cpu_ms: float | None, model_step_ms_per_utt: float) -> None:
    """The worker with its encoder stubbed out: its own overhead measured directly, against the floor."""
    if cpu_ms is None or not passthrough_cpu_ms:
        print(f"stubbed   {rate:8.1f} utt/s  (the worker, encoder stubbed out)")
        return
    print(f"stubbed   {rate:8.1f} utt/s  (the worker, encoder stubbed out: {cpu_ms:.2f} core-ms/utt = "
          f"{cpu_ms / passthrough_cpu_ms:.2f} x passthrough (target <= 2.0), measured directly; of which the model's "
          f"step ~{model_step_ms_per_utt:.2f})")
    floor = (passthrough_cpu_ms + model_step_ms_per_utt) / passthrough_cpu_ms
    print(f"  floor with the model's step as it is: {floor:.2f} x passthrough (passthrough + step, were Redis, "
          "events and rules free)")


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)
