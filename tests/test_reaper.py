"""A local run's Ray ends with its driver: after SIGKILL of `rlpipe train`, none of the processes it started
(GCS, raylet, agents, workers) is left behind. Linux (reads /proc)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.reaper import _stat, descendants


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the reaper reads /proc (Linux)")
def test_killed_driver_leaves_no_ray_process_behind(tiny_task, tmp_path):
    rlpipe = str(Path(sys.executable).with_name("rlpipe"))
    args = [rlpipe, "train", "--config", "grpo", f"model.path={tiny_task['model']}",
            f"data.train_path={tiny_task['data']['train']}", "data.eval_path=null", f"train.output_dir={tmp_path}/run",
            "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=4",
            "resources.num_cpus=2", "resources.cpus_per_rollout_worker=0.5", "resources.cpus_per_learner=0.5",
            "resources.torch_threads=1", "train.steps=100000", "train.time_budget_s=null"]
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in driver.stdout:                       # wait until it trains
            if line.startswith("step"):
                break
        ray_processes = descendants(driver.pid)
        assert len(ray_processes) >= 4, ray_processes    # gcs, raylet, agents, workers, the reaper
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        deadline = time.monotonic() + 30
        left = ray_processes
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = {p: s for p, s in left.items() if (_stat(p) or (0, None))[1] == s}
        names = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left if Path(f"/proc/{p}").exists()}
        assert not left, names
    finally:
        if driver.poll() is None:
            driver.kill()
