"""Sweeps: the search space as data, trial placement, and real Tune sweeps recorded in a real MLflow store.

The sweeps run the tiny task with the `sevens` reward (a random model earns it), so learning rates make
trials differ and ASHA has something to cut.
"""
import csv
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import mlflow
import pytest
import ray
import yaml

from actors.cli import main
from actors.pools import ClusterTooSmall
from pipeline.config import load_config
from tuning.space import SpaceError, load_space, parse_space
from tuning.sweep import check_trial_fits
from tuning.trainable import DRIVER_BUNDLE, trial_bundles

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SPACE = os.path.join(REPO, "tuning", "default_space.yaml")
SMALL = ["resources.num_cpus=2", "resources.cpus_per_rollout_worker=0.4", "resources.cpus_per_learner=0.4",
         "resources.cpus_per_reward_scorer=0.1", "resources.torch_threads=1"]   # 0.91 CPU: two trials fit 2 CPUs


def task_args(task, *extra):
    return [f"model.path={task['model']}", f"data.train_path={task['data']['train']}",
            f"data.eval_path={task['data']['eval']}", "data.eval_size=10", "rollout.prompts_per_step=8",
            "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6",
            "reward.functions=[tests.rewards_for_tests:sevens]",
            "train.eval_every=4", "checkpoint.every=2", "train.log_samples_every=0", "tracking.plot=false",
            *SMALL, *extra]


# ------------------------------------------------------------------------------------------- the space

@pytest.mark.unit
def test_default_space_covers_lr_clip_and_entropy():
    space = load_space(DEFAULT_SPACE, load_config("grpo"))
    assert space.fields == ["learner.lr", "algorithm.clip_range", "algorithm.entropy_coef"]
    below_geometric_mean = []
    for domain in space.param_space().values():
        draws = domain.sample(size=2000, random_state=0)
        assert domain.lower <= min(draws) and max(draws) <= domain.upper
        below_geometric_mean.append(sum(x < (domain.lower * domain.upper) ** 0.5 for x in draws) / len(draws))
    # log-uniform draws fall below the geometric mean half the time; uniform draws far less often
    assert below_geometric_mean[0] == pytest.approx(0.5, abs=0.05) and below_geometric_mean[1] < 0.45
    assert below_geometric_mean[2] == pytest.approx(0.5, abs=0.05)


@pytest.mark.unit
def test_integer_fields_sample_integers_and_grid_and_choice_pass_through():
    space = parse_space({"rollout.samples_per_prompt": {"uniform": [2, 8]},
                         "algorithm.name": {"choice": ["grpo", "rloo"]},
                         "train.seed": {"grid": [0, 1]}}, load_config("grpo"))
    domains = space.param_space()
    draws = {domains["rollout.samples_per_prompt"].sample() for _ in range(200)}
    assert draws == set(range(2, 9))                      # high is inclusive
    assert domains["train.seed"] == {"grid_search": [0, 1]}
    assert space.mutations()["algorithm.name"] == ["grpo", "rloo"]


@pytest.mark.unit
def test_pbt_perturbations_are_clipped_into_the_bounds():
    space = parse_space({"algorithm.clip_range": {"uniform": [0.1, 0.3]},
                         "rollout.max_new_tokens": {"uniform": [4, 8]}},
                        load_config("grpo"))
    assert space.clip({"algorithm.clip_range": 0.36, "rollout.max_new_tokens": 9.6}) == {
        "algorithm.clip_range": 0.3, "rollout.max_new_tokens": 8}


@pytest.mark.unit
@pytest.mark.parametrize("spec, fragment", [
    ({"learner.lrr": {"loguniform": [1e-5, 1e-3]}}, "unknown config field 'learner.lrr'; valid fields in learner: weight_decay,"),
    ({"optimizer.lr": {"uniform": [0.1, 0.2]}}, "unknown config field 'optimizer.lr'; fields are section.name"),
    ({"learner.lr": {"normal": [1e-4, 1e-5]}},
     "unknown distribution 'normal'; valid: choice, grid, loguniform, uniform"),
    ({"learner.lr": {"uniform": [1e-3, 1e-4]}}, "learner.lr: uniform bounds need low < high"),
    ({"learner.lr": {"loguniform": [0, 1e-3]}}, "learner.lr: loguniform needs low > 0"),
    ({"learner.lr": {"uniform": [1e-4]}}, "learner.lr: uniform needs two numbers [low, high]"),
    ({"learner.lr": {"uniform": ["a", "b"]}}, "learner.lr: uniform needs two numbers"),
    ({"learner.lr": {"uniform": [0.5, 2.0]}}, "learner.lr value 2.0 fails the config's validation"),
    ({"algorithm.name": {"choice": ["grpo", "ppo2"]}}, "algorithm.name value 'ppo2' fails"),
    ({"rollout.samples_per_prompt": {"grid": [1, 4]}}, "grpo compares samples within a group"),
    ({"algorithm.kl_estimator": {"uniform": [1, 3]}}, "algorithm.kl_estimator is a str field"),
    ({"rollout.max_new_tokens": {"uniform": [2.5, 8]}}, "integer field; give integer bounds"),
    ({"learner.lr": {"uniform": [1e-4, 1e-3], "loguniform": [1e-4, 1e-3]}}, "expected one distribution"),
    ({"learner.lr": {"choice": []}}, "choice needs a non-empty list"),
    ({}, "expected a mapping of config fields to distributions"),
])
def test_invalid_space_one_clear_error(spec, fragment):
    with pytest.raises(SpaceError) as err:
        parse_space(spec, load_config("grpo"))
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.unit
def test_invalid_space_on_the_command_line_is_one_line_and_writes_nothing(tiny_task, tmp_path, capsys):
    bad = tmp_path / "space.yaml"
    bad.write_text("learner.lr: {loguniform: [1.0e-3, 1.0e-5]}\n")
    out = tmp_path / "sweep"
    assert main(["tune", "--config", "grpo", "--space", str(bad), "--out", str(out), *task_args(tiny_task)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "learner.lr: loguniform bounds need low < high" in err[0], err
    assert not out.exists()


# ------------------------------------------------------------------------------------------- resources

@pytest.mark.unit
def test_trial_reserves_a_driver_bundle_and_one_per_actor():
    cfg = load_config("grpo", SMALL + ["algorithm.kl_coef=0.1", "resources.cpus_per_reference=0.2"])
    assert trial_bundles(cfg) == [DRIVER_BUNDLE, {"CPU": 0.4}, {"CPU": 0.4}, {"CPU": 0.1}, {"CPU": 0.2}]


@pytest.mark.unit
def test_a_trial_the_space_can_make_too_big_is_refused_up_front():
    tree = load_config("grpo", SMALL).to_dict()
    space = parse_space({"resources.rollout_workers": {"choice": [1, 4]}}, load_config(base=tree))
    assert check_trial_fits(tree, parse_space({"learner.lr": {"uniform": [1e-4, 1e-3]}}, load_config(base=tree)),
                            {"CPU": 2.0})[0] == DRIVER_BUNDLE
    with pytest.raises(ClusterTooSmall, match=r"one trial does not fit .* needs 2.11 CPU .* cluster has 2"):
        check_trial_fits(tree, space, {"CPU": 2.0})


@pytest.mark.ray
def test_trial_that_cannot_fit_stops_the_cli_before_anything_starts(tiny_task, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = task_args(tiny_task, "resources.cpus_per_learner=1.5")
    assert main(["tune", "--config", "grpo", "--space", DEFAULT_SPACE, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one trial does not fit the cluster" in err[0] and "2.01 CPU" in err[0], err
    assert not out.exists() and not ray.is_initialized()


@pytest.mark.ray
def test_actors_started_in_a_trial_land_in_their_own_bundles(tiny_task, tmp_path):
    """Tune's capture puts a trial's actors in its group; pools pins each to its bundle. This layout
    (a small learner before a big generator) could strand the generator if actors took any bundle."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.pools import start_actors

    cfg = load_config("grpo", task_args(tiny_task, "resources.cpus_per_learner=0.2",
                                        "resources.cpus_per_rollout_worker=0.6",
                                        "resources.cpus_per_reward_scorer=0.2"))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    try:
        pg = placement_group(trial_bundles(cfg))
        ray.get(pg.ready(), timeout=60)

        @ray.remote(num_cpus=DRIVER_BUNDLE["CPU"])
        def trial():
            pools = start_actors(cfg)
            ray.get([a.__ray_ready__.remote() for a in pools.all()], timeout=120)
            where = ray.get([a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_placement_group_id())
                             for a in pools.all()])
            free = {k: v for k, v in ray.available_resources().items() if k.startswith("CPU_group_")}
            return where, free

        where, free = ray.get(trial.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote(), timeout=180)
        assert where == [pg.id.hex()] * 3
        for i in (1, 2, 3):   # each actor's bundle is used up exactly: every actor sits in its own bundle
            assert free.get(f"CPU_group_{i}_{pg.id.hex()}", 0.0) < 1e-6, free
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------- sweeps

WRITER = """
import sys
from pipeline.tracking import Tracker
tracker = Tracker(sys.argv[1], run_name=sys.argv[2], parent_run_id=sys.argv[3])
for step in range(1, 101):
    tracker.log_metrics(step, {f"m{i}": step * i for i in range(8)})
tracker.finish()
"""


@pytest.mark.unit
def test_concurrent_trials_share_one_sqlite_store_without_losing_a_step(tmp_path):
    """Two trial processes log every step into the sweep's sqlite store at once (no 'database is locked')."""
    from pipeline.tracking import Tracker

    parent = Tracker(tmp_path, run_name="sweep")   # the sweep creates the store before any trial starts
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), f"trial{i}", parent.run_id], cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=REPO), stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    for w in writers:
        assert w.wait(timeout=180) == 0, w.stderr.read()[-2000:]
    client, runs = _mlflow_runs(tmp_path)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.run_id]
    assert len(children) == 2
    for child in children:
        for key in ("m0", "m7"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == list(range(1, 101))

def _lines(proc, sink: queue.Queue) -> None:
    for line in proc.stdout:
        sink.put(line)
    sink.put(None)


def _mlflow_runs(out):
    client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rlpipe").experiment_id])
    return client, runs


@pytest.mark.slow
def test_asha_sweep_interrupted_and_resumed_is_complete_in_mlflow(tiny_task, tmp_path):
    """4 trials (2 at a time on a 2-CPU Ray) through the CLI; interrupted (SIGINT) once two trials have
    ended, then resumed: finished trials are not run again, ASHA stopped one early, and MLflow holds one
    parent and four children with the sampled params and every step once."""
    space = tmp_path / "space.yaml"   # a learning rate that cannot learn in 8 steps and one that can
    space.write_text("learner.lr: {grid: [1.0e-5, 3.0e-2]}\nalgorithm.clip_range: {uniform: [0.1, 0.3]}\n"
                     "algorithm.entropy_coef: {loguniform: [1.0e-4, 1.0e-2]}\n")
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "tuning.sweep", "--config", "grpo", "--space", str(space), "--num-samples", "2",
           # ASHA's first cut at step 4, not 2: one step's reward/mean of 32 samples from a random tiny model
           # is noise (0.03-0.09 over steps at lr 1e-5), while by step 4 lr 3e-2 has learned (~0.2).
           "--concurrency", "2", "--max-steps", "8", "--metric", "reward/mean", "--grace-period", "4",
           "--reduction-factor", "3", "--out", str(out), *task_args(tiny_task)]
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, output, ended = queue.Queue(), [], []
    threading.Thread(target=_lines, args=(proc, lines), daemon=True).start()
    try:
        while len(ended) < 2:   # the next two need many seconds to start, so they are mid-way at SIGINT
            line = lines.get(timeout=300)
            assert line is not None, "".join(output[-40:])
            output.append(line)
            match = re.match(r"trial (\S+) (completed|stopped early) at step", line)
            if match:
                ended.append(match.group(1))
        proc.send_signal(signal.SIGINT)   # Ctrl-C: Tune saves its state and stops the running trials
        while (line := lines.get(timeout=240)) is not None:
            output.append(line)
        assert proc.wait(timeout=240) == 130, "".join(output[-40:])
    finally:
        proc.kill()
    text = "".join(output)
    assert "trials unfinished; continue with `rlpipe tune --resume" in text
    ended = re.findall(r"^trial (\S+) (?:completed|stopped early) at step", text, re.M)
    trial_dir = {t: out / "tune" / t for t in ended}
    starts_before = {t: (trial_dir[t] / "starts.log").read_text() for t in ended}

    assert main(["tune", "--resume", str(out)]) == 0

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"completed", "stopped early"}
    steps = {r["trial"]: int(r["steps"]) for r in rows}
    stopped = [r["trial"] for r in rows if r["status"] == "stopped early"]
    assert stopped and all(steps[t] < 8 for t in stopped), rows
    assert all(steps[r["trial"]] == 8 for r in rows if r["status"] == "completed")
    for t in ended:   # not re-run: still the one start, and no second MLflow run below
        assert (trial_dir[t] / "starts.log").read_text() == starts_before[t]
        assert len(starts_before[t].splitlines()) == 1

    client, runs = _mlflow_runs(out)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4 and parents[0].info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.tags["tune.trial_id"] for c in children} == set(steps)
    for child in children:
        trial = child.data.tags["tune.trial_id"]
        sampled = json.loads((out / "tune" / trial / "params.json").read_text())
        assert {k: float(child.data.params[k]) for k in sampled} == pytest.approx(sampled)
        for key in ("reward/mean", "policy/approx_kl", "policy/entropy", "time/step_s"):
            logged = sorted(m.step for m in client.get_metric_history(child.info.run_id, key))
            assert logged == list(range(1, steps[trial] + 1)), (trial, key, logged)
        expected = "KILLED" if trial in stopped else "FINISHED"
        assert child.info.status == expected
        assert child.data.tags["rlpipe.trial_status"] == ("stopped early" if trial in stopped else "completed")
    parent_files = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"results.csv", "results.md", "trials_reward.png", "trials_accuracy.png", "best_config.yaml",
            "best_model"} <= parent_files
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["learner"]["lr"] == pytest.approx(3e-2)   # the learning rate that learns wins


@pytest.mark.unit
def test_a_cloned_checkpoint_becomes_the_runs_only_one_and_keeps_the_trials_own_mlflow_run(tmp_path):
    """What a PBT exploit hands a trial: another trial's checkpoint, which must not pull in that trial's
    later checkpoints of our own or its MLflow run."""
    import torch
    from ray import tune

    from pipeline.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from tuning.trainable import _restore_into_run

    donor = save_checkpoint(tmp_path / "donor" / "checkpoints", 4, models={"policy": {"w": torch.ones(2)}},
                            optimizers={}, extra={"step": 4, "mlflow_run_id": "donor-run"})
    run_dir = tmp_path / "trial" / "run"
    save_checkpoint(run_dir / "checkpoints", 6, models={"policy": {"w": torch.zeros(2)}}, optimizers={},
                    extra={"step": 6, "mlflow_run_id": "own-run"})
    assert _restore_into_run(tune.Checkpoint.from_directory(donor), str(run_dir), "own-run") == 4
    restored = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    assert os.listdir(run_dir / "checkpoints") == ["step_000004"] and restored.step == 4
    assert restored.extra["mlflow_run_id"] == "own-run" and torch.equal(restored.models["policy"]["w"], torch.ones(2))
    _restore_into_run(tune.Checkpoint.from_directory(donor), str(tmp_path / "fresh" / "run"), None)
    assert load_checkpoint(tmp_path / "fresh" / "run" / "checkpoints" / "step_000004").extra["mlflow_run_id"] is None


@pytest.mark.slow
def test_pbt_sweep_runs_and_each_trial_logs_to_its_own_run(tiny_task, tmp_path):
    """Two asynchronous trials (staleness 1) under PBT, their batches within the bound. When PBT exploits (its
    timing is Ray's: a trial that finishes before the other reaches a perturbation is never compared), the
    exploiting trial restarts from the cloned checkpoint. (A synchronous trial checkpoints and restarts through
    the same code; the ASHA test sweeps synchronous trials.)"""
    extra = ["rollout.max_staleness=1", "algorithm.tis_cap=2.0"]
    space = tmp_path / "space.yaml"
    space.write_text("learner.lr: {grid: [1.0e-5, 3.0e-2]}\n")
    out = tmp_path / "pbt"
    args = ["tune", "--config", "grpo", "--space", str(space), "--num-samples", "1", "--concurrency", "2",
            "--max-steps", "4", "--scheduler", "pbt", "--perturbation-interval", "2", "--metric", "reward/mean",
            "--out", str(out), *task_args(tiny_task), *extra]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["status"] for r in rows] == ["completed", "completed"], rows
    assert yaml.safe_load((out / "tune" / rows[0]["trial"] / "run" / "config.yaml").read_text())["checkpoint"][
        "every"] == 2                                               # trials checkpoint at every perturbation
    starts = {r["trial"]: (out / "tune" / r["trial"] / "starts.log").read_text().splitlines() for r in rows}
    for trial, lines in starts.items():
        if (out / "tune" / f"pbt_policy_{trial}.txt").exists():    # PBT made this trial clone another
            assert len(lines) > 1 and re.search(r"start from step [1-9]", lines[1]), lines
    client, runs = _mlflow_runs(out)
    children = {r.data.tags["tune.trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == set(starts)
    for trial, child in children.items():   # each trial logs to its own run, each step once, in order
        logged = [m.step for m in client.get_metric_history(child.info.run_id, "reward/mean")]
        assert logged[0] == 1 and sorted(set(logged)) == sorted(logged) and max(logged) == 4, (trial, logged)
        segments = client.get_metric_history(child.info.run_id, "hparam/learner.lr")   # one per start that trained
        assert 1 <= len(segments) <= len(starts[trial])
        staleness = [m.value for m in client.get_metric_history(child.info.run_id, "policy/staleness")]
        assert max(staleness) == 1.0, (trial, staleness)
