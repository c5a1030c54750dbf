"""One training run end to end: checks, Ray, actors, the step loop, evaluation, checkpoints, tracking.

Uses `pipeline.runs.preflight` (checks before anything is written), `actors.pools` (placement and start),
`actors.driver` (the step), `pipeline.checkpoint`, `pipeline.tracking` and `pipeline.plots`.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

from pipeline.config import RunConfig


def cluster_address(address: Optional[str] = None) -> Optional[str]:
    """The Ray cluster a run joins: `address`, else $RAY_ADDRESS; None = a local Ray on this machine."""
    return address or os.environ.get("RAY_ADDRESS")


def init_ray(num_cpus: Optional[int] = None, address: Optional[str] = None) -> bool:
    """Join `address`/$RAY_ADDRESS, or start a local Ray on this machine with `num_cpus` (default: all its
    cores). True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cluster_address(address)
    if address:
        ray.init(address=address, logging_level="WARNING")
        return False
    # Ray 2.60 warns on every local start that token authentication is on. It stays on (README: Running on a
    # cluster); the warning, which a local user can only act on by turning auth off, is dropped.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    from actors.reaper import driver_descendants, start_reaper

    before = driver_descendants()
    # address="local": without it ray.init joins whatever cluster /tmp/ray/ray_current_cluster names (a
    # `ray start` head or another process's Ray on this machine) and then fails on num_cpus.
    # Progress bars of every actor's model load would interleave on the driver's console.
    env = {"PYTHONPATH": local_pythonpath(),
           "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1")}
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             logging_level="WARNING", runtime_env={"env_vars": env})
    start_reaper(before)       # this Ray's processes end with this driver, even when it is killed
    return True


def local_pythonpath() -> str:
    """The driver's own import path (cwd and user folders, not site-packages) for local actors, so a
    reward function the driver can import by `module:function` imports the same way in a scorer."""
    import sys

    std = (sys.prefix, sys.base_prefix, sys.exec_prefix)
    user = [p for p in sys.path if p and os.path.isdir(p) and "site-packages" not in p
            and not any(os.path.abspath(p).startswith(os.path.join(s, "lib")) for s in std)]
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys([os.getcwd(), *user, *extra]))


def resume_config_path(run_dir: str) -> str:
    """The saved config of the `rlpipe train` run in run_dir, for `--resume`; a folder of another command
    (`rlpipe sft`, `rlpipe reward-model`) or of none is refused, naming what it is and how to resume it."""
    from pipeline.runs.folder import claim_run_folder

    claim_run_folder(run_dir, "config.yaml", resume=True, overwrite=False, where="train.output_dir")
    return os.path.join(run_dir, "config.yaml")


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool):
    """The latest checkpoint to resume from (or None), after claiming the run folder (`pipeline.runs.folder`)."""
    from pipeline.checkpoint import latest_checkpoint, load_checkpoint
    from pipeline.runs.folder import RunFolderError, claim_run_folder

    run_dir = cfg.train.output_dir
    if not resume:
        claim_run_folder(run_dir, "config.yaml", resume=False, overwrite=overwrite, where="train.output_dir")
        return None
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    path = latest_checkpoint(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    if path is None:
        raise RunFolderError(f"--resume: no checkpoint in {ckpt_dir}; start the run without --resume")
    return load_checkpoint(path)


def run_training(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, address: Optional[str] = None,
                 on_step: Optional[Callable] = None, log: Callable = print) -> dict:
    """Train until `train.steps` or `train.time_budget_s`. Returns a summary dict.

    `on_step(step, metrics, trainer)` is called after each logged step (a Ray Tune trial reports through
    it, a benchmark collects its figures).
    """
    import ray

    from ray.exceptions import RayActorError

    from actors.driver import Trainer
    from actors.pools import start_actors
    from actors.resilient import ActorLost
    from pipeline.checkpoint import latest_checkpoint, load_checkpoint
    from pipeline.runs.preflight import preflight
    from pipeline.tracking import ConsoleLog, Tracker, flatten_config

    # Nothing is written before these checks pass. On a cluster the actors import their own nodes' packages.
    train_table, eval_table, _ = preflight(cfg, log, local_actors=cluster_address(address) is None)
    ckpt = prepare_run_dir(cfg, resume, overwrite)
    started_ray = init_ray(cfg.resources.num_cpus, address)
    pools = None
    try:
        pools = start_actors(cfg)
        pools.wait_ready()                              # model-load errors surface before the run dir exists
        run_dir = cfg.train.output_dir
        os.makedirs(run_dir, exist_ok=True)
        config_path = os.path.join(run_dir, "config.yaml")
        with open(config_path, "w") as fh:
            fh.write(cfg.to_yaml())
        tracker = Tracker(run_dir, experiment=cfg.tracking.experiment,
                          run_name=cfg.tracking.run_name or os.path.basename(os.path.abspath(run_dir)),
                          tracking_uri=cfg.tracking.tracking_uri,
                          resume_run_id=ckpt.extra["mlflow_run_id"] if ckpt else None,
                          parent_run_id=cfg.tracking.parent_run_id)
        with tracker:
            if ckpt is None:
                tracker.log_params(flatten_config(cfg.to_dict()))
                tracker.log_artifact(config_path)
            console = ConsoleLog(total_steps=cfg.train.steps, time_budget_s=cfg.train.time_budget_s)
            recoveries = 0
            while True:
                trainer = Trainer(cfg, pools, train_table, eval_table, tracker, console)
                if ckpt is not None:
                    trainer.restore(ckpt)
                    log(f"resumed {run_dir} at step {trainer.step_count} (policy version {trainer.version})")
                try:
                    return _loop(cfg, trainer, tracker, run_dir, on_step, log)
                except (RayActorError, ActorLost) as err:
                    # Generators and scorers are restarted in place (driver); losing the learner or the
                    # reference loses optimizer state, so the run restarts its actors from a checkpoint.
                    if recoveries >= cfg.checkpoint.recoveries:
                        raise
                    recoveries += 1
                    path = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
                    log(f"step {trainer.step_count + 1}: an actor was lost ({type(err).__name__}); restarting the "
                        f"actors from {path or 'the start'} (recovery {recoveries}/{cfg.checkpoint.recoveries})")
                    pools.shutdown()
                    pools = start_actors(cfg)
                    pools.wait_ready()
                    ckpt = load_checkpoint(path) if path else None
    finally:
        if pools is not None:
            pools.shutdown()
        if started_ray:
            ray.shutdown()


EVAL_NAMES = {"eval/accuracy": "exact match", "eval/success": "episode success"}


def _loop(cfg: RunConfig, trainer, tracker, run_dir: str, on_step, log) -> dict:
    from pipeline.plots import plot_training_curves

    t, budget = cfg.train, cfg.train.time_budget_s
    key, name = trainer.eval_key, EVAL_NAMES[trainer.eval_key]
    if trainer.step_count == 0:
        acc = trainer.evaluate()
        if acc is not None:
            tracker.log_metrics(0, {key: acc, **trainer.eval_metrics})
            log(f"step 0: held-out {name} {acc:.1%} before RL")
    last_saved, last_eval_s = trainer.step_count, trainer.elapsed_s
    while trainer.step_count < t.steps and (budget is None or trainer.elapsed_s < budget):
        start = time.perf_counter()
        metrics = trainer.step()
        step = trainer.step_count
        now_s = trainer.elapsed_s + time.perf_counter() - start
        out_of_time = budget is not None and now_s >= budget
        timed_eval = t.eval_every_s is not None and now_s - last_eval_s >= t.eval_every_s
        if trainer.eval_rows is not None and (step % t.eval_every == 0 or step == t.steps or out_of_time
                                              or timed_eval):
            metrics[key] = trainer.evaluate()
            metrics.update(trainer.eval_metrics)
            last_eval_s = now_s
        trainer.elapsed_s += time.perf_counter() - start
        metrics["time/elapsed_s"] = trainer.elapsed_s
        tracker.log_metrics(step, {k: v for k, v in metrics.items() if v is not None})
        trainer.console.log(step, metrics)
        if t.log_samples_every and step % t.log_samples_every == 0:
            tracker.log_table(trainer.samples(), f"rollouts_step_{step:06d}")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            trainer.save(run_dir)
            last_saved = step
        if on_step is not None:
            on_step(step, metrics, trainer)
    if last_saved != trainer.step_count:
        trainer.save(run_dir)
    final_dir = os.path.join(run_dir, "final_model")
    from pipeline.checkpoint import write_folder

    write_folder(trainer.learners.hf_files(), final_dir)   # the learner may be on another node
    tracker.log_artifact(final_dir, "final_model")
    history = tracker.history.get(key, [])
    elapsed = dict(tracker.history.get("time/elapsed_s", []))
    summary = {
        "steps": trainer.step_count, "elapsed_s": round(trainer.elapsed_s, 1),
        "initial_accuracy": history[0][1] if history else None,
        "final_accuracy": history[-1][1] if history else None,
        "best_accuracy": max(v for _, v in history) if history else None,
        "run_dir": run_dir, "mlflow_run_id": tracker.run_id, "final_model": final_dir,
        "accuracy_curve_s": [(elapsed.get(step, 0.0), acc) for step, acc in history],
    }
    tracker.log_metrics(trainer.step_count + 1, {f"summary/{k}": v for k, v in summary.items()
                                                 if isinstance(v, (int, float)) and k != "steps"})
    if cfg.tracking.plot:
        png = plot_training_curves(tracker.history, os.path.join(run_dir, "curves.png"),
                                   title=f"{cfg.algorithm.name} on {os.path.basename(cfg.data.train_path)}")
        tracker.log_artifact(png)
    if history:
        log(f"done: {summary['steps']} steps in {summary['elapsed_s']:.0f} s, held-out {name} "
            f"{summary['initial_accuracy']:.1%} -> {summary['final_accuracy']:.1%} (best {summary['best_accuracy']:.1%})")
    else:
        log(f"done: {summary['steps']} steps in {summary['elapsed_s']:.0f} s (no data.eval_path: no held-out score)")
    return summary
