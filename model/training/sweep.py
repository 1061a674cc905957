"""Run many training configurations (ablations x seeds) in parallel and tabulate dev scores.

    python -m model.training.sweep --plan model/configs/ablations.toml --data-dir DIR --out runs/ablations --jobs 4

Each run is `emotion-monitor train` in its own process (one GPU is shared well by many small
runs: they are latency-bound). The table (mean and standard deviation over seeds) goes to
OUT/ablations.md and OUT/summary.json; the model card quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from model.offline import MODES


def plan_runs(plan: dict) -> list[dict]:
    """Expand [runs.NAME] tables x seeds into jobs, in plan order (first runs first)."""
    jobs = []
    for name, spec in plan["runs"].items():
        for seed in spec.get("seeds", plan.get("seeds", [13])):
            # data_seeds: several runs from the same initial weights (`seed`), for `emotion-monitor soup`.
            for data_seed in spec.get("data_seeds", [None]):
                # A plan-level `set` applies to every run (e.g. pinning a recipe value the default later changed).
                merged = {**plan.get("set", {}), **spec.get("set", {})}
                if data_seed is not None:
                    merged["data_seed"] = data_seed
                sets = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in merged.items()]
                jobs.append({"name": name, "dataset": spec["dataset"], "seed": seed, "data_seed": data_seed, "set": sets,
                             "label": spec.get("label", name)})
    return jobs


def run_dir_name(job: dict) -> str:
    return f"{job['name']}-s{job['seed']}" + (f"-d{job['data_seed']}" if job.get("data_seed") is not None else "")


def launch(job: dict, data_dir: Path, out: Path) -> subprocess.Popen:
    run_dir = out / run_dir_name(job)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "model.cli", "train", "--dataset", job["dataset"], "--data-dir", str(data_dir),
           "--out", str(run_dir), "--seed", str(job["seed"])]
    for s in job["set"]:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    log = open(run_dir / "train.log", "w")
    job["dir"], job["started"] = run_dir, time.time()
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def summarize(jobs: list[dict], out: Path) -> dict:
    table: dict[str, dict] = {}
    for job in jobs:
        metrics_file = Path(job.get("dir", out / "-")) / "dev_metrics.json"
        entry = table.setdefault(job["name"], {"label": job["label"], "dataset": job["dataset"], "seeds": [], **{m: [] for m in MODES}})
        if metrics_file.exists():
            m = json.loads(metrics_file.read_text())
            entry["seeds"].append(job["seed"])
            for mode in MODES:
                entry[mode].append(m[f"weighted_f1_{mode}"])
    lines = ["| run | dataset | seeds | offline | final | provisional |", "|---|---|---|---|---|---|"]
    for name, e in table.items():
        cells = []
        for mode in MODES:
            v = e[mode]
            cells.append("n/a" if not v else f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}")
        lines.append(f"| {e['label']} | {e['dataset']} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.training.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", type=Path, required=True,
                   help="TOML with seeds = [...], an optional set = {...} for every run, and [runs.NAME] tables (dataset, set = {...})")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--deadline", type=float, default=None, help="seconds: launch nothing after 70%% of it, kill what still runs at it")
    args = p.parse_args(argv)
    plan = tomllib.loads(args.plan.read_text())
    jobs = plan_runs(plan)
    args.out.mkdir(parents=True, exist_ok=True)
    t0, queue, running = time.time(), list(jobs), []
    while queue or running:
        elapsed = time.time() - t0
        late = args.deadline is not None and elapsed > 0.7 * args.deadline
        while queue and len(running) < args.jobs and not late:
            job = queue.pop(0)
            running.append((job, launch(job, args.data_dir, args.out)))
        if late and queue:
            print(f"deadline: {len(queue)} runs not started", flush=True)
            queue.clear()
        for job, proc in list(running):
            if proc.poll() is not None:
                running.remove((job, proc))
                job["rc"], job["seconds"] = proc.returncode, round(time.time() - job["started"], 1)
                print(f"{run_dir_name(job)}: rc {proc.returncode} in {job['seconds']} s", flush=True)
            elif args.deadline is not None and elapsed > args.deadline:
                proc.kill()
        time.sleep(1.0)
    summarize(jobs, args.out)
    print((args.out / "ablations.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
