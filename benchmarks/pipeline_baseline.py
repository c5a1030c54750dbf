"""Baseline figures of the local demo pipeline: step time, samples/s, each stage's share, peak memory.

Runs the real `rlpipe train` loop (a preset, default grpo) for a few steps from the demo warm start and
samples the resident memory of the driver and every process below it (Ray's GCS, raylet and all actor
workers) every 0.2 s. RSS summed over processes counts shared pages once per process, so the figure is
an upper bound of what the run needs.

    python benchmarks/pipeline_baseline.py [--config grpo] [--steps 20] [overrides...]
Needs `rlpipe warmstart` first (runs/demo) and psutil (`pip install -e '.[bench]'`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAGES = ("sample", "generate", "score", "reference", "advantages", "update", "sync")


class PeakMemory:
    """Polls the summed RSS of this process tree in a background thread."""

    def __init__(self, interval_s: float = 0.2):
        import psutil

        self.root, self.interval_s, self.peak_bytes, self.peak_procs = psutil.Process(), interval_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total, procs = 0, [self.root, *self.root.children(recursive=True)]
            for p in procs:
                try:
                    total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_procs = total, len(procs)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="grpo", help="preset or YAML file (default grpo)")
    parser.add_argument("--steps", type=int, default=20, help="training steps to time (default 20)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rollout.prompts_per_step=32")
    args = parser.parse_args()

    from actors.run import run_training
    from pipeline.config import load_config

    out = tempfile.mkdtemp(prefix="rlpipe-bench-")
    cfg = load_config(args.config, [f"train.steps={args.steps}", "train.time_budget_s=null",
                                    f"train.eval_every={args.steps}", "checkpoint.every=0",
                                    "train.log_samples_every=0", "tracking.plot=false",
                                    f"train.output_dir={out}/run", *args.overrides])
    rows: list[dict] = []
    with PeakMemory() as mem:
        start = time.perf_counter()
        run_training(cfg, on_step=lambda step, m, trainer: rows.append(m), log=lambda *a: None)
        wall_s = time.perf_counter() - start
    timed = rows[2:] if len(rows) > 4 else rows   # the first steps include lazy initialisation
    step_s = statistics.median(r["time/step_s"] for r in timed)
    samples = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    print(f"\n{args.config}: B={cfg.rollout.prompts_per_step} x G={cfg.rollout.samples_per_prompt}, "
          f"max_new_tokens={cfg.rollout.max_new_tokens}, {len(timed)} timed steps, {os.cpu_count()} CPUs")
    print(f"step time (median)  {step_s:7.3f} s      samples/s  {samples / step_s:7.1f}      "
          f"generated tokens/s  {statistics.median(r['throughput/tokens_per_s'] for r in timed):,.0f}")
    total = sum(statistics.mean(r.get(f"time/{s}_s", 0.0) for r in timed) for s in STAGES)
    for stage in STAGES:
        mean_s = statistics.mean(r.get(f"time/{stage}_s", 0.0) for r in timed)
        print(f"  {stage:<11} {mean_s:7.3f} s  {100 * mean_s / total:5.1f} %")
    print(f"peak memory, all {mem.peak_procs} processes of the run together: {mem.peak_bytes / 2**30:.2f} GiB "
          f"(RSS sum)  | whole run incl. start-up and eval: {wall_s:.0f} s")


if __name__ == "__main__":
    main()
