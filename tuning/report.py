"""What a sweep shows: a console line per finished trial, and at the end a results table, the trials'
curves, and the best trial's config and model on the MLflow parent run.

Trial status in the table and on the child runs: `completed` (its loop ran to train.steps or its time
budget and wrote summary.json; MLflow FINISHED), `stopped early` (the scheduler ended it; MLflow KILLED,
tag rlpipe.trial_status), `error` (MLflow FAILED, Tune's error.txt in the trial directory), `unfinished`
(the sweep was interrupted; --resume runs it). Tune marks every trial it ends TERMINATED, so the
summary.json a trial writes after its loop is what tells completed from stopped. The best trial is the
one with the best last reported value of the sweep metric among trials that did not fail.
"""
from __future__ import annotations

import csv
import json
import os

from ray.tune import Callback

from pipeline.plots import markdown_table
from tuning.trainable import SUMMARY_FILE

STATUS_TAG = "rlpipe.trial_status"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def _short(field: str) -> str:
    return field.rsplit(".", 1)[-1]


def describe_params(params: dict, fields: list[str]) -> str:
    return " ".join(f"{_short(f)}={_fmt(params.get(f))}" for f in fields)


class TrialConsole(Callback):
    """One line per trial that ends: how it ended, at which step, its metric and settings."""

    def __init__(self, fields: list[str], metric: str):
        self.fields, self.metric = fields, metric

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        how = "completed" if os.path.exists(os.path.join(trial.path, SUMMARY_FILE)) else "stopped early"
        shown = dict.fromkeys([self.metric, "reward/mean"])   # the metric first, reward/mean once
        figures = " | ".join(f"{key} {_fmt(r.get(key))}" for key in shown)
        print(f"trial {trial.trial_id} {how} at step {r.get('step', '?')}: {figures} | "
              f"{describe_params(trial.config, self.fields)}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        print(f"trial {trial.trial_id} failed at step {r.get('step', 0)}: see {trial.path}/error.txt", flush=True)


def open_parent_run(sweep_dir: str, base, space, opts, name: str):
    """The sweep's MLflow parent run: sweep options and the space as params, the inputs as artifacts."""
    from dataclasses import asdict

    from pipeline.tracking import Tracker

    parent = Tracker(sweep_dir, experiment=base.tracking.experiment, run_name=os.path.basename(os.path.abspath(name)),
                     tracking_uri=base.tracking.tracking_uri,
                     tags={"rlpipe.kind": "sweep", "rlpipe.sweep_dir": sweep_dir})
    params = {f"sweep.{k}": v for k, v in asdict(opts).items()}
    params.update({f"space.{field}": json.dumps(spec) for field, spec in space.to_spec().items()})
    parent.log_params(params)
    parent.log_dict_as_yaml(space.to_spec(), "search_space.yaml")
    parent.log_dict_as_yaml(base.to_dict(), "base_config.yaml")
    return parent


def _child_runs(parent) -> dict:
    """Tune trial id -> MLflow child run, for the runs that are children of `parent`."""
    runs = parent.client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'",
                                     max_results=10_000)
    return {r.data.tags["tune.trial_id"]: r for r in runs if "tune.trial_id" in r.data.tags}


def _unfinished(sweep_dir: str) -> set[str]:
    """Trial ids that `Tuner.restore` would run again, read from Tune's saved experiment state. (After an
    interrupt Tune marks the trials it ends TERMINATED in memory, but saved them as they were.)"""
    import logging

    from ray.tune import ExperimentAnalysis

    from tuning.trainable import TRIALS_DIR

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)   # it warns "no results" for each trial that never started
    try:
        trials = ExperimentAnalysis(os.path.join(sweep_dir, TRIALS_DIR)).trials
    finally:
        quiet.setLevel(level)
    return {t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")}


def _rows(results, children: dict, space, metric: str, unfinished: set[str]) -> list[dict]:
    rows = []
    for result in results:
        m = result.metrics or {}
        trial_id = os.path.basename(result.path)   # the sweep names trial dirs by id (a PBT result may carry
                                                   # its donor's trial_id)
        status = ("error" if result.error else "unfinished" if trial_id in unfinished else
                  "completed" if os.path.exists(os.path.join(result.path, SUMMARY_FILE)) else "stopped early")
        run = children.get(trial_id)
        row = {"trial": trial_id, "status": status, "steps": m.get("step", 0)}
        row.update({f: (result.config or {}).get(f) for f in space.fields})
        row.update({metric: m.get(metric), "reward/mean": m.get("reward/mean"), "eval/accuracy": m.get("eval/accuracy"),
                    "time/elapsed_s": m.get("time/elapsed_s"), "mlflow_run_id": run.info.run_id if run else None,
                    "run_dir": os.path.join(result.path, "run")})
        rows.append(row)
    return rows


def _write_tables(rows: list[dict], sweep_dir: str) -> tuple[str, str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    csv_path, md_path = os.path.join(sweep_dir, "results.csv"), os.path.join(sweep_dir, "results.md")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in columns if c not in ("mlflow_run_id", "run_dir")]
    with open(md_path, "w") as fh:
        fh.write(markdown_table(shown, [[_fmt(row.get(c)) for c in shown] for row in rows]) + "\n")
    return csv_path, md_path


def _plot_curves(parent, rows: list[dict], fields: list[str], sweep_dir: str) -> list[str]:
    from pipeline.plots import plot_comparison

    pngs = []
    for key, ylabel, name, scale in (("reward/mean", "reward (mean over samples)", "trials_reward.png", 1),
                                     ("eval/accuracy", "held-out exact match (%)", "trials_accuracy.png", 100)):
        curves = {}
        for row in rows:
            if row["mlflow_run_id"]:
                points = parent.client.get_metric_history(row["mlflow_run_id"], key)
                curves[f"{row['trial'][-5:]} {describe_params(row, fields)}"] = [(p.step, scale * p.value)
                                                                                 for p in points]
        pngs.append(plot_comparison(curves, os.path.join(sweep_dir, name), "step", ylabel, f"{key} per trial"))
    return pngs


def _mark_children(parent, rows: list[dict], children: dict) -> None:
    """Tag each child with how its trial ended; runs of trials the scheduler stopped end as KILLED
    (their process was ended mid-run, so their Tracker never closed them); failed ones end as FAILED."""
    for row in rows:
        run = children.get(row["trial"])
        if run is None:
            continue
        parent.client.set_tag(run.info.run_id, STATUS_TAG, row["status"])
        if run.info.status == "RUNNING" and row["status"] in ("stopped early", "error"):
            parent.client.set_terminated(run.info.run_id, status="KILLED" if row["status"] == "stopped early"
                                         else "FAILED")


def _write_best_config(best: dict, sweep_dir: str) -> str:
    """The best trial's config, ready for `rlpipe train --config <it>`: the same settings, but a fresh output
    directory and MLflow store instead of the trial's (the trial's own config.yaml is on its child run)."""
    import yaml

    with open(os.path.join(best["run_dir"], "config.yaml")) as fh:
        config = yaml.safe_load(fh)
    config["train"]["output_dir"] = os.path.join(sweep_dir, "best")
    config["tracking"].update(tracking_uri=None, run_name=None)
    path = os.path.join(sweep_dir, "best_config.yaml")
    with open(path, "w") as fh:
        fh.write(f"# Best trial {best['trial']} of the sweep in {sweep_dir}; retrain with "
                 f"`rlpipe train --config {path}`\n")
        yaml.safe_dump(config, fh, sort_keys=False)
    return path


def finish_sweep(results, parent, sweep_dir: str, space, opts, wall_s: float) -> dict:
    """Write and log the table, curves and best trial; print them; close the parent run."""
    metric, sign = opts.metric, (1 if opts.mode == "max" else -1)
    unfinished = _unfinished(sweep_dir)
    children = _child_runs(parent)
    rows = sorted(_rows(results, children, space, metric, unfinished),
                  key=lambda r: -sign * r[metric] if r[metric] is not None else float("inf"))
    csv_path, md_path = _write_tables(rows, sweep_dir)
    for path in (csv_path, md_path, os.path.join(sweep_dir, "sweep.yaml")):
        parent.log_artifact(path)
    sessions = parent.client.get_metric_history(parent.run_id, "sweep/wall_s")   # one point per (resumed) fit
    parent.client.log_metric(parent.run_id, "sweep/wall_s", wall_s, step=len(sessions))
    total_s = wall_s + sum(m.value for m in sessions)
    with open(md_path) as fh:
        print(fh.read(), end="", flush=True)
    summary = {"wall_s": total_s, "rows": rows, "interrupted": bool(unfinished), "parent_run_id": parent.run_id,
               "best": None}
    if unfinished:
        print(f"sweep interrupted after {wall_s:.0f} s: {len(unfinished)} of {len(rows)} trials unfinished; continue "
              f"with `rlpipe tune --resume {sweep_dir}`", flush=True)
        parent.finish("KILLED")
        return summary
    _mark_children(parent, rows, children)
    for png in _plot_curves(parent, rows, space.fields, sweep_dir):
        parent.log_artifact(png)
    candidates = [r for r in rows if r["status"] != "error" and r[metric] is not None]
    if candidates:
        best = candidates[0]
        summary["best"] = best
        best_config_path = _write_best_config(best, sweep_dir)
        parent.log_artifact(best_config_path)
        model = os.path.join(best["run_dir"], "final_model")
        if os.path.isdir(model):
            parent.log_artifact(model, "best_model")
        parent.client.log_metric(parent.run_id, f"best/{metric}", float(best[metric]))
        for key, value in (("rlpipe.best_trial", best["trial"]), ("rlpipe.best_run_id", best["mlflow_run_id"])):
            parent.client.set_tag(parent.run_id, key, str(value))
        print(f"best trial {best['trial']} ({best['status']}, {best['steps']} steps): {metric} {_fmt(best[metric])}"
              f" | {describe_params(best, space.fields)} | config {best_config_path}"
              + (f" | model {model}" if os.path.isdir(model) else " | no final model (stopped before the end)"),
              flush=True)
    this_session = f" ({wall_s:.0f} s since the resume)" if sessions else ""
    print(f"sweep done in {total_s:.0f} s{this_session}: {len(rows)} trials, MLflow parent run {parent.run_id} at "
          f"{parent.tracking_uri}", flush=True)
    parent.finish("FINISHED")
    return summary
