"""Cluster deployment: `cluster.yaml` against Ray's own launcher schema, the KubeRay RayJob manifest, and a
real `ray job submit` of `python -m actors.train` to a real `ray start --head` with token auth on.

The job test starts its head in a session of its own with an isolated `--temp-dir`, its own free ports and
its own token file (`RAY_AUTH_TOKEN_PATH`, so `~/.ray/auth_token` is neither read nor written), and stops it
by that session: `ray stop` has no address option and would stop every Ray on the machine.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from tests.test_train_e2e import run_args

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).with_name("ray"))       # the venv's `ray`, same Ray as the job's workers
# What `--working-dir` must not upload (Ray also skips what .gitignore lists): the venv, history, run outputs.
WORKING_DIR_EXCLUDES = [".git", ".venv", "runs", "mlruns", "mlartifacts", "*.db", "__pycache__"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


# ----------------------------------------------------------------------------------------- cluster.yaml

def launcher_schema() -> dict:
    """Ray's own cluster-launcher schema, from the installed package (found without importing ray)."""
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


def keys_without_comment_above(text: str) -> list[str]:
    """Mapping keys whose previous non-blank line is not a comment (block scalars and list items skipped)."""
    missing, previous, block_indent = [], "", None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:                      # inside a `|` / `>` scalar: its lines are text
            if not stripped or indent > block_indent:
                continue
            block_indent = None
        if not stripped:
            continue
        if re.match(r"[\w.~/\"'-]+\s*:(\s|$)", stripped) and not previous.startswith("#"):
            missing.append(f"line {number}: {stripped}")
        if re.search(r":\s*[|>][-+]?\s*(#.*)?$", stripped):
            block_indent = indent
        previous = stripped
    return missing


@pytest.mark.unit
def test_cluster_yaml_validates_against_ray_launcher_schema():
    import jsonschema

    text = (REPO / "cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    schema = launcher_schema()
    jsonschema.validate(cfg, schema)
    # The schema bites: a misspelled top-level key is rejected (additionalProperties: false).
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        jsonschema.validate({**cfg, "idle_timeout_minute": 5}, schema)

    # What the schema cannot express.
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu_workers = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers, "no GPU worker node type"
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
    # The run checks the actor layout against the resources that exist when it starts (actors/pools.py),
    # so a GPU node must already be up: an autoscaler starting from zero GPUs would never be asked.
    assert sum(t["min_workers"] for t in gpu_workers) >= 1
    # Ray 2.60 token auth: the token reaches every node, and every `ray start` runs in token mode (a
    # worker started without RAY_AUTH_MODE=token is refused by the head's GCS).
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in cfg["head_start_ray_commands"])
    assert any(re.search(r"pip install .*-e .*\[cluster\]", c) for c in cfg["setup_commands"])
    assert keys_without_comment_above(text) == []


# ----------------------------------------------------------------------------------------- KubeRay

def kuberay_rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "kuberay-rayjob.yaml").read_text()) if d]
    (job,) = [d for d in docs if d.get("kind") == "RayJob"]
    return job


def entrypoint_overrides(entrypoint: str) -> tuple[str, list[str]]:
    """`python -m actors.train --config NAME a.b=c ...` -> (NAME, overrides)."""
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "actors.train"], argv
    assert argv[3] == "--config", argv
    return argv[4], argv[5:]


@pytest.mark.unit
def test_kuberay_rayjob_has_entrypoint_head_and_gpu_workers():
    job = kuberay_rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    preset, overrides = entrypoint_overrides(spec["entrypoint"])
    assert preset == "grpo"
    cfg = load_config(preset, overrides)            # every override is a real config field with a valid value

    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = cluster["workerGroupSpecs"]
    gpus_per_pod = [int(c["resources"]["limits"]["nvidia.com/gpu"])
                    for g in groups for c in g["template"]["spec"]["containers"]
                    if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]
    assert gpus_per_pod and min(gpus_per_pod) >= 1
    # The actors' GPU shares fit one worker pod (the run packs them into one placement group).
    r = cfg.resources
    assert 0 < r.gpus_per_learner + r.rollout_workers * r.gpus_per_rollout_worker <= max(gpus_per_pod)
    images = [c["image"] for c in head["template"]["spec"]["containers"]]
    images += [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert all(cluster["rayVersion"] in image for image in images), (cluster["rayVersion"], images)


# ----------------------------------------------------------------------------------------- a real job

@dataclass
class Head:
    dashboard: str          # http://127.0.0.1:<port>: the dashboard and job server
    env: dict               # what a client needs: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH
    token: str
    root: Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http_get(url: str, token: str | None = None, timeout_s: float = 10.0):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.status, json.loads(response.read() or b"null")


def stop_session(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop `ray start --block` (SIGTERM: it stops the processes it started), then SIGKILL what is left in
    its session. Raylet-started workers get process groups of their own but stay in this session."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if os.getsid(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(5)


@pytest.fixture
def ray_head():
    """A real head (`ray start --head --block`, dashboard and job server on) with token authentication."""
    root = Path(tempfile.mkdtemp(prefix="rlp-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    token = secrets.token_hex(32)                             # what `ray get-auth-token --generate` writes
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no stray RAY_ADDRESS etc.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0")
    gcs, dashboard, client, agent = free_ports(4)
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(
        [RAY_CLI, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={root / 'ray'}", "--disable-usage-stats", "--block"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dashboard}", env, token, root)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"ray start exited:\n{(root / 'head.log').read_text()[-3000:]}"
            try:
                if http_get(f"{head.dashboard}/api/jobs/", token, timeout_s=2)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"job server not up:\n{(root / 'head.log').read_text()[-3000:]}"
            time.sleep(1)
        yield head
    finally:
        stop_session(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def ray_cli(head: Head, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY_CLI, *args], env=head.env, capture_output=True, text=True, timeout=timeout_s,
                          cwd=REPO)


def job_status(head: Head, submission_id: str) -> str:
    """`ray job status` prints `Status for job 'id': RUNNING` while it runs, `Job 'id' succeeded` at the end."""
    out = ray_cli(head, "job", "status", "--address", head.dashboard, submission_id)
    text = out.stdout + out.stderr
    match = re.search(r"Status for job '[^']+': (\w+)", text) or re.search(r"Job '[^']+' (\w+)", text)
    return match.group(1).upper() if match else f"UNKNOWN ({text.strip()[-300:]})"


@pytest.mark.slow
def test_ray_job_submit_trains_on_a_token_auth_head_and_logs_to_mlflow(ray_head, tiny_task, tmp_path):
    import mlflow

    head = ray_head
    # Auth is on: the job server refuses a request without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        http_get(f"{head.dashboard}/api/jobs/")
    assert refused.value.code == 401

    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    overrides = run_args(tiny_task, out, "train.steps=3", "train.time_budget_s=null", "train.eval_every=3",
                         "checkpoint.every=0", "resources.cpus_per_reward_scorer=0.25",
                         f"tracking.tracking_uri=sqlite:///{db}")
    # sys.executable, not `python`: the job inherits the head's PATH, where `python` may be another one.
    entrypoint = [sys.executable, "-m", "actors.train", "--config", "grpo", *overrides]
    runtime_env = {"excludes": WORKING_DIR_EXCLUDES, "env_vars": {"HF_HUB_OFFLINE": "1"}}
    submission_id = f"rlpipe-test-{secrets.token_hex(4)}"
    submitted = ray_cli(head, "job", "submit", "--address", head.dashboard, "--working-dir", str(REPO),
                        "--runtime-env-json", json.dumps(runtime_env), "--submission-id", submission_id,
                        "--no-wait", "--", *entrypoint)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr

    deadline, status = time.monotonic() + 240, "PENDING"
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(3)
        status = job_status(head, submission_id)
    logs = ray_cli(head, "job", "logs", "--address", head.dashboard, submission_id).stdout
    assert status == "SUCCEEDED", f"{status}\n{logs[-4000:]}"
    assert "step 3/3" in logs

    # The actors ran on this head's cluster (the job joined it through RAY_ADDRESS, no Ray of its own).
    _, actors = http_get(f"{head.dashboard}/api/v0/actors?limit=100", head.token)
    classes = {a["class_name"] for a in actors["data"]["result"]["result"]}
    assert {"Learner", "RolloutWorker", "RewardScorer"} <= classes, classes

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("rlpipe").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id in logs                         # the run the job printed is the one in the store
    assert run.data.params["train.steps"] == "3"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward/mean"))
    assert steps == [1, 2, 3]
    assert {"eval/accuracy", "time/elapsed_s"} <= set(run.data.metrics)
    assert (out / "final_model" / "config.json").exists()
