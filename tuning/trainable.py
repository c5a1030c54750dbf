"""One Tune trial = one `run_training` call, in the trial's own placement group.

The trial's config is the sweep's base config with the sampled (or PBT-mutated) dotted values set, its
run directory inside the trial directory, and the sweep's MLflow store; its MLflow run is a child of
the sweep's parent run, tagged with the Tune trial id. The trial directory is `<sweep>/tune/<trial id>`.

Reporting: `tune.report` after every training step with the step's metrics (reward/mean,
policy/approx_kl, time/step_s, ...). Held-out `eval/accuracy` is measured only on eval steps (every
`train.eval_every` steps, and at step 0); on the steps between, the last measured value is reported again
and `eval/step` says which step it came from. So ASHA rungs (grace_period * reduction_factor**k) should fall
on eval steps when the metric is `eval/accuracy` -- `tuning.sweep` warns when the grace period does not.

Checkpoints: the pipeline's loop writes `<run>/checkpoints/step_N` every `checkpoint.every` steps just
before it calls us; that directory is handed to Tune with the same step's report, so the checkpoint
Tune holds and the step it reports always agree. A trial that Tune restarts (PBT exploit, a resumed
sweep, a paused trial) gets `tune.get_checkpoint()`; it is copied in as the run's only checkpoint and
the run resumes from it, logging to the trial's own MLflow run (never the donor's, under PBT).

Resources: `TrialResources` reserves one bundle for this function (the trial driver, 0.01 CPU) and one
per actor from `actors.pools.layout`; `start_actors`, called inside the trial's placement group, pins each
actor to its bundle, so concurrent trials never compete for CPUs or GPUs.

MLflow: the trial's run is a child of the sweep's parent run through `tracking.parent_run_id`, set in the
sweep's base config.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

import yaml

from pipeline.checkpoint import update_checkpoint_extra
from pipeline.config import RunConfig, load_config, set_dotted
from pipeline.tracking import flatten_config

TRIALS_DIR = "tune"             # the Tune experiment inside the sweep directory; a folder per trial id
DRIVER_BUNDLE = {"CPU": 0.01}   # this function: the Trainer's loop, MLflow calls; the actors do the work
RUN_ID_FILE = "mlflow_run_id"   # in the trial directory: the trial's own MLflow child run
STARTS_FILE = "starts.log"      # in the trial directory: one line per (re)start of the trial
SUMMARY_FILE = "summary.json"   # in the trial directory: written when the trial's loop ran to its end


def trial_config(base_tree: dict, params: dict, run_dir: str | None = None, run_name: str | None = None) -> RunConfig:
    """The base config with the trial's dotted values (and its run directory and MLflow run name) set."""
    tree = yaml.safe_load(yaml.safe_dump(base_tree))   # deep copy of plain data
    for field, value in params.items():
        set_dotted(tree, field, value)
    if run_dir is not None:
        set_dotted(tree, "train.output_dir", run_dir)
    if run_name is not None:
        set_dotted(tree, "tracking.run_name", run_name)
    return load_config(base=tree)


def trial_bundles(cfg: RunConfig) -> list[dict]:
    from actors.pools import layout

    return [dict(DRIVER_BUNDLE)] + [dict(b) for _, b in layout(cfg)]


class TrialResources:
    """`tune.with_resources` callable: the placement group of the trial whose config Tune passes in."""

    def __init__(self, base_tree: dict):
        self.base_tree = base_tree

    def __call__(self, params: dict):
        from ray import tune

        cfg = trial_config(self.base_tree, params)
        return tune.PlacementGroupFactory(trial_bundles(cfg), strategy=cfg.resources.placement_strategy)


def _restore_into_run(checkpoint, run_dir: str, own_run_id: str | None) -> int:
    """Make Tune's checkpoint the run's only (so latest) checkpoint; returns its step."""
    root = os.path.join(run_dir, "checkpoints")
    shutil.rmtree(root, ignore_errors=True)   # a later checkpoint of our own would win otherwise
    with checkpoint.as_directory() as src:
        with open(os.path.join(src, "meta.json")) as fh:
            step = json.load(fh)["step"]
        dst = os.path.join(root, f"step_{step:06d}")
        shutil.copytree(src, dst)
    # Under PBT the checkpoint may be another trial's: keep logging to our own run (None: a new child run).
    update_checkpoint_extra(dst, mlflow_run_id=own_run_id)
    return step


class StepReporter:
    """`on_step` for `run_training`: one `tune.report` per training step, with the step's checkpoint."""

    def __init__(self, cfg: RunConfig, params: dict, trial_dir: str):
        self.cfg, self.params, self.trial_dir = cfg, params, trial_dir
        self.first = True

    def __call__(self, step: int, metrics: dict, trainer) -> None:
        from ray import tune

        from pipeline.checkpoint import latest_checkpoint

        tracker = trainer.tracker
        if self.first:
            self._link_run(tracker, step)
        result = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        evals = tracker.history.get("eval/accuracy", [])
        if evals:   # the last measured held-out accuracy (this step's when it was an eval step)
            result["eval/step"], result["eval/accuracy"] = evals[-1]
        result["step"] = step
        checkpoint = None
        every = self.cfg.checkpoint.every
        if every and step % every == 0:   # the loop saved this step's checkpoint just before calling us
            path = latest_checkpoint(os.path.join(self.cfg.train.output_dir, "checkpoints"))
            if path and path.endswith(f"step_{step:06d}"):
                checkpoint = tune.Checkpoint.from_directory(path)
        tune.report(result, checkpoint=checkpoint)

    def _link_run(self, tracker, step: int) -> None:
        """Once per (re)start: record the child run, tag it, and log params and the searched values."""
        from ray import tune

        self.first = False
        ctx = tune.get_context()
        with open(os.path.join(self.trial_dir, RUN_ID_FILE), "w") as fh:
            fh.write(tracker.run_id)
        tracker.client.set_tag(tracker.run_id, "tune.trial_id", ctx.get_trial_id())
        tracker.client.set_tag(tracker.run_id, "tune.trial_dir", self.trial_dir)
        tracker.log_params(flatten_config(self.cfg.to_dict()))   # no-op for params already logged (a resumed run)
        # Params are immutable; values PBT changes mid-run show as `hparam/<field>` metrics over steps.
        for field, value in self.params.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                tracker.client.log_metric(tracker.run_id, f"hparam/{field}", float(value), step=step)


def train_trial(params: dict, *, base_tree: dict, trials_dir: str) -> None:
    """The Tune function trainable. `params`: {dotted field: value} from the search space.

    `trials_dir` is the Tune experiment directory; the sweep names each trial's directory by its trial id.
    (`tune.get_context().get_trial_dir()` is a staging folder that differs after `Tuner.restore`, so the
    run, its checkpoints and our markers live in the persistent trial directory instead.)
    """
    from ray import tune

    from actors.run import run_training

    logging.getLogger("ray.train").setLevel(logging.WARNING)   # one "Checkpoint successfully created" per save
    ctx = tune.get_context()
    trial_dir = os.path.join(trials_dir, ctx.get_trial_id())
    os.makedirs(trial_dir, exist_ok=True)
    run_dir = os.path.join(trial_dir, "run")
    cfg = trial_config(base_tree, params, run_dir, run_name=ctx.get_trial_id())
    id_path = os.path.join(trial_dir, RUN_ID_FILE)
    own_run_id = open(id_path).read().strip() if os.path.exists(id_path) else None
    checkpoint = tune.get_checkpoint()
    resumed_at = _restore_into_run(checkpoint, run_dir, own_run_id) if checkpoint is not None else None
    if os.path.exists(os.path.join(trial_dir, SUMMARY_FILE)):
        os.remove(os.path.join(trial_dir, SUMMARY_FILE))   # from an earlier attempt; this one has not ended
    if checkpoint is None and own_run_id:
        # Restarted from scratch (no checkpoint yet): this attempt's run replaces the earlier one, which
        # is soft-deleted (restorable in MLflow) so the sweep keeps one child run per trial.
        from mlflow import MlflowClient

        MlflowClient(cfg.tracking.tracking_uri).delete_run(own_run_id)
    with open(os.path.join(trial_dir, STARTS_FILE), "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} start from step {resumed_at or 0} "
                 f"{json.dumps(params, default=str)}\n")
    summary = run_training(cfg, resume=checkpoint is not None, overwrite=checkpoint is None,
                           on_step=StepReporter(cfg, params, trial_dir))
    # Only a trial whose loop ended gets here: a trial the scheduler stops is ended inside tune.report.
    with open(os.path.join(trial_dir, SUMMARY_FILE), "w") as fh:
        json.dump(summary, fh, default=str)
