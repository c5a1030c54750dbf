"""`rlpipe tune`: a Ray Tune sweep over the training pipeline, recorded in MLflow.

    rlpipe tune --config grpo --space tuning/default_space.yaml --num-samples 4 --concurrency 2 \
        --max-steps 20 --time-budget-s 120 --out runs/sweep [section.field=value ...]
    rlpipe tune --resume runs/sweep          # continue an interrupted sweep (Tuner.restore)

Everything is checked before anything starts: the config, the search space, the model/data/reward
functions (the pipeline's preflight), and that one trial's placement group fits the cluster.

Sweep directory:
    sweep.yaml           base config, search space, options, MLflow ids: what --resume reads
    asha_state.pkl       ASHA's rungs (Tune does not save scheduler state), for --resume
    tune/<trial_id>/     Tune's trial directories; run/ inside each is the pipeline's run directory
    mlflow.db, mlartifacts/   the MLflow store (unless $MLFLOW_TRACKING_URI names another)
    results.csv, results.md, trials_reward.png, trials_accuracy.png, best_config.yaml   (at the end)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import yaml

from pipeline.errors import UserInputError

DEFAULT_SPACE = os.path.join(os.path.dirname(__file__), "default_space.yaml")
SWEEP_FILE = "sweep.yaml"
ASHA_STATE = "asha_state.pkl"         # ASHA's rungs, for --resume
PATH_FIELDS = ("model.path", "model.critic_path", "data.train_path", "data.eval_path")


class SweepError(UserInputError):
    """Bad sweep options, or a sweep directory that does not match the command."""


@dataclass
class SweepOptions:
    num_samples: int = 4                  # draws from the space (x the grid size when it has grid fields)
    concurrency: int = 2                  # trials running at once (fewer when the cluster holds fewer)
    max_steps: Optional[int] = None       # per trial: train.steps (None: the config's)
    time_budget_s: Optional[float] = None  # per trial: train.time_budget_s (None: the config's)
    scheduler: str = "asha"               # asha | pbt
    metric: str = "eval/accuracy"
    mode: str = "max"
    grace_period: Optional[int] = None    # ASHA: steps before the first cut (None: train.eval_every)
    reduction_factor: int = 2             # ASHA: keep the top 1/reduction_factor at each rung
    perturbation_interval: int = 4        # PBT: steps between exploit/explore (= checkpoint.every)
    seed: int = 0                         # the search's random draws


def _base_tree(cfg, opts: SweepOptions, tracking_uri: str, parent_run_id: Optional[str] = None) -> dict:
    """The config every trial starts from: paths made absolute (trials run in other directories),
    per-trial budgets from the command line, the sweep's MLflow store and parent run."""
    from pipeline.config import set_dotted

    tree = cfg.to_dict()
    for field in PATH_FIELDS:
        section, name = field.split(".")
        value = tree[section][name]
        if value and os.path.exists(value):
            tree[section][name] = os.path.abspath(value)
    if opts.max_steps is not None:
        set_dotted(tree, "train.steps", opts.max_steps)
    if opts.time_budget_s is not None:
        set_dotted(tree, "train.time_budget_s", opts.time_budget_s)
    if opts.scheduler == "pbt":   # PBT can only exploit a trial at a step where it reported a checkpoint
        set_dotted(tree, "checkpoint.every", opts.perturbation_interval)
    set_dotted(tree, "tracking.tracking_uri", tracking_uri)
    set_dotted(tree, "tracking.parent_run_id", parent_run_id)
    return tree


def check_trial_fits(base_tree: dict, space, available: dict) -> list[dict]:
    """ClusterTooSmall unless the largest trial the space can produce fits; returns the base trial's bundles."""
    import itertools

    from actors.pools import ClusterTooSmall, check_fits
    from tuning.trainable import trial_bundles, trial_config

    # Only resource fields and kl_coef (a reference actor) change a trial's layout; try their extremes.
    layout_dims = [d for d in space.dimensions if d.field.startswith("resources.") or d.field == "algorithm.kl_coef"]
    for combo in itertools.product(*[d.values for d in layout_dims]):
        bundles = trial_bundles(trial_config(base_tree, {d.field: v for d, v in zip(layout_dims, combo)}))
        roles = [("trial driver", bundles[0])] + [(f"actor {i}", b) for i, b in enumerate(bundles[1:], 1)]
        try:
            check_fits(roles, available)
        except ClusterTooSmall as err:
            raise ClusterTooSmall(f"one trial does not fit the cluster, so no trial can start: {err}") from None
    return trial_bundles(trial_config(base_tree, {}))


def _trainable(base_tree: dict, sweep_dir: str):
    from ray import tune

    from tuning.trainable import TRIALS_DIR, TrialResources, train_trial

    trainable = tune.with_parameters(train_trial, base_tree=base_tree, trials_dir=os.path.join(sweep_dir, TRIALS_DIR))
    return tune.with_resources(trainable, TrialResources(base_tree))


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _resumable_asha(state_path: str, **kwargs):
    """ASHA whose rungs survive `Tuner.restore`. Tune saves trials but not the scheduler, so a resumed
    ASHA would judge new trials against empty rungs; this one saves itself (ASHAScheduler.save) after every
    decision and reloads that file the first time it is used after a restore."""
    from ray.tune.schedulers import ASHAScheduler

    class ResumableASHA(ASHAScheduler):
        def __init__(self):
            super().__init__(**kwargs)
            self._state_path, self._loaded = state_path, False

        def _load_once(self) -> None:
            if not self._loaded:
                self._loaded = True
                if os.path.exists(self._state_path):
                    self.restore(self._state_path)

        def on_trial_add(self, tune_controller, trial):
            self._load_once()
            super().on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            self._load_once()
            decision = super().on_trial_result(tune_controller, trial, result)
            self.save(self._state_path + ".tmp")
            os.replace(self._state_path + ".tmp", self._state_path)   # never a half-written state
            return decision

    return ResumableASHA()


def _tuner(base_tree: dict, space, opts: SweepOptions, sweep_dir: str):
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from tuning.report import TrialConsole
    from tuning.trainable import TRIALS_DIR

    steps = base_tree["train"]["steps"]
    # PBT clones the checkpoint a donor had at its last perturbation, which the donor may have rotated out
    # since ("does not exist on storage anymore"): under PBT Tune keeps every checkpoint.
    keep = 2 if opts.scheduler == "asha" else None
    if opts.scheduler == "asha":
        # max_t one past the last step: the trial's own loop ends it (saving its final model), not ASHA.
        scheduler = _resumable_asha(os.path.join(sweep_dir, ASHA_STATE), time_attr="training_iteration",
                                    metric=opts.metric, mode=opts.mode, max_t=steps + 1,
                                    grace_period=opts.grace_period, reduction_factor=opts.reduction_factor)
    else:
        scheduler = PopulationBasedTraining(time_attr="training_iteration", metric=opts.metric, mode=opts.mode,
                                            perturbation_interval=opts.perturbation_interval,
                                            hyperparam_mutations=space.mutations(), custom_explore_fn=space.clip)
    return tune.Tuner(
        _trainable(base_tree, sweep_dir),
        param_space=space.param_space(),
        # The random search takes the concurrency cap itself (Tune ignores max_concurrent_trials with it).
        tune_config=tune.TuneConfig(num_samples=opts.num_samples, scheduler=scheduler,
                                    trial_dirname_creator=_trial_dirname,
                                    search_alg=BasicVariantGenerator(random_state=opts.seed,
                                                                     max_concurrent=opts.concurrency)),
        run_config=tune.RunConfig(name=TRIALS_DIR, storage_path=sweep_dir, verbose=0,
                                  callbacks=[TrialConsole(space.fields, opts.metric)],
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=keep)),
    )


def run_sweep(config: Optional[str], space_path: str, opts: SweepOptions, out: str, overrides=(),
              address: Optional[str] = None) -> dict:
    """Validate everything, then run a new sweep in `out`. Returns the report's summary dict."""
    from actors.run import cluster_address
    from pipeline.config import load_config
    from pipeline.runs.preflight import preflight
    from pipeline.tracking import default_tracking_uri
    from tuning.space import load_space

    if opts.scheduler not in ("asha", "pbt"):
        raise SweepError(f"--scheduler {opts.scheduler!r}: use asha or pbt")
    if opts.mode not in ("min", "max"):
        raise SweepError(f"--mode {opts.mode!r}: use min or max")
    for name, value, low in (("--num-samples", opts.num_samples, 1), ("--concurrency", opts.concurrency, 1),
                             ("--max-steps", opts.max_steps, 1), ("--grace-period", opts.grace_period, 1),
                             ("--reduction-factor", opts.reduction_factor, 2),
                             ("--perturbation-interval", opts.perturbation_interval, 1)):
        if value is not None and value < low:
            raise SweepError(f"{name} {value}: must be at least {low}")
    sweep_dir = os.path.abspath(out)
    if os.path.exists(os.path.join(sweep_dir, SWEEP_FILE)):
        raise SweepError(f"--out {out!r} already holds a sweep; continue it with `rlpipe tune --resume {out}` or "
                         "choose another --out")
    cfg = load_config(config, list(overrides))
    space = load_space(space_path, cfg)
    if opts.metric == "eval/accuracy" and not cfg.data.eval_path:
        raise SweepError("--metric eval/accuracy needs held-out data (data.eval_path); set it or use "
                         "--metric reward/mean")
    if opts.grace_period is None:
        opts.grace_period = cfg.train.eval_every
    tree = _base_tree(cfg, opts, default_tracking_uri(sweep_dir))
    base = load_config(base=tree)
    # model, data, reward functions; on a cluster the trials' actors import their own nodes' packages
    preflight(base, local_actors=cluster_address(address) is None)
    started_ray = _init_ray(base, address)
    try:
        import ray

        bundles = check_trial_fits(tree, space, ray.cluster_resources())
        _say_layout(bundles, ray.cluster_resources(), opts, base)
        from tuning.report import open_parent_run

        parent = open_parent_run(sweep_dir, base, space, opts, out)
        tree = _base_tree(cfg, opts, parent.tracking_uri, parent.run_id)   # trials nest under the parent run
        state = {"base_config": tree, "space": space.to_spec(), "options": asdict(opts),
                 "mlflow": {"tracking_uri": parent.tracking_uri, "parent_run_id": parent.run_id}}
        with open(os.path.join(sweep_dir, SWEEP_FILE), "w") as fh:
            yaml.safe_dump(state, fh, sort_keys=False)
        tuner = _tuner(tree, space, opts, sweep_dir)
        return _fit_and_report(tuner, parent, sweep_dir, space, opts)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def resume_sweep(sweep_dir: str, address: Optional[str] = None) -> dict:
    """Continue the sweep in `sweep_dir`: unfinished trials resume from their last checkpoint, finished
    ones are not run again, errored ones are retried from their last checkpoint."""
    from ray import tune

    from pipeline.config import load_config
    from pipeline.tracking import Tracker
    from tuning.space import parse_space
    from tuning.trainable import TRIALS_DIR

    path = os.path.join(sweep_dir, SWEEP_FILE)
    if not os.path.exists(path):
        raise SweepError(f"--resume {sweep_dir!r}: no {SWEEP_FILE} there; start a sweep with --config/--space")
    with open(path) as fh:
        state = yaml.safe_load(fh)
    sweep_dir = os.path.abspath(sweep_dir)
    tree, opts = state["base_config"], SweepOptions(**state["options"])
    base = load_config(base=tree)
    space = parse_space(state["space"], base, where=f"{path} space")
    started_ray = _init_ray(base, address)
    try:
        parent = Tracker(sweep_dir, experiment=base.tracking.experiment, tracking_uri=state["mlflow"]["tracking_uri"],
                         resume_run_id=state["mlflow"]["parent_run_id"])
        print(f"resuming sweep {sweep_dir} (MLflow parent run {parent.run_id})", flush=True)
        tuner = tune.Tuner.restore(os.path.join(sweep_dir, TRIALS_DIR), _trainable(tree, sweep_dir),
                                   resume_unfinished=True, resume_errored=True)
        return _fit_and_report(tuner, parent, sweep_dir, space, opts)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _init_ray(cfg, address: Optional[str]) -> bool:
    from actors.run import init_ray

    return init_ray(cfg.resources.num_cpus, address)


def _say_layout(bundles: list[dict], cluster: dict, opts: SweepOptions, cfg) -> None:
    cpus = sum(b.get("CPU", 0.0) for b in bundles)
    gpus = sum(b.get("GPU", 0.0) for b in bundles)
    fit = int(min(cluster.get("CPU", 0.0) / cpus if cpus else 1e9, cluster.get("GPU", 0.0) / gpus if gpus else 1e9))
    at_once = min(fit, opts.concurrency)
    print(f"each trial reserves {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "") +
          f" in its own placement group; the cluster ({cluster.get('CPU', 0):g} CPU) runs {at_once} at once"
          + (f" (fewer than --concurrency {opts.concurrency})" if at_once < opts.concurrency else ""), flush=True)
    if opts.scheduler == "asha" and opts.metric == "eval/accuracy" and opts.grace_period % cfg.train.eval_every:
        print(f"note: ASHA cuts at step {opts.grace_period}, but eval/accuracy is measured every "
              f"{cfg.train.eval_every} steps; the cut uses the last measured value. Set --grace-period to a "
              "multiple of train.eval_every.", flush=True)


def _fit_and_report(tuner, parent, sweep_dir: str, space, opts: SweepOptions) -> dict:
    from tuning.report import finish_sweep

    # Tune warns on every burst of checkpoints when num_to_keep is set; trials here checkpoint often by design.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    start = time.perf_counter()
    try:
        results = tuner.fit()
    except BaseException as err:
        parent.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    return finish_sweep(results, parent, sweep_dir, space, opts, wall_s=time.perf_counter() - start)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SweepOptions()
    p.add_argument("--config", "-c", help="base YAML config or preset name (grpo, ppo, ...)")
    p.add_argument("--space", default=DEFAULT_SPACE, help="search space YAML: dotted field -> {loguniform|uniform|"
                   "choice|grid: [...]} (default: tuning/default_space.yaml: lr, clip range, entropy coef)")
    p.add_argument("--resume", metavar="SWEEP_DIR", help="continue the interrupted sweep in SWEEP_DIR")
    p.add_argument("--out", default="runs/sweep", help="sweep directory (default runs/sweep)")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="trials drawn from the space (default 4)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="trials at once (default 2)")
    p.add_argument("--max-steps", type=int, help="training steps per trial (default: the config's train.steps)")
    p.add_argument("--time-budget-s", type=float, help="training seconds per trial (default: the config's "
                   "train.time_budget_s)")
    p.add_argument("--scheduler", choices=("asha", "pbt"), default=d.scheduler, help="ASHA early stopping "
                   "(default) or population based training")
    p.add_argument("--metric", default=d.metric, help="metric the scheduler compares (default eval/accuracy, "
                   "the last measured value between evals; reward/mean is fresh every step)")
    p.add_argument("--mode", choices=("min", "max"), default=d.mode, help="maximise or minimise --metric")
    p.add_argument("--grace-period", type=int, help="ASHA: steps before a trial can be stopped (default: "
                   "train.eval_every)")
    p.add_argument("--reduction-factor", type=int, default=d.reduction_factor, help="ASHA: keep the best "
                   "1/N at each rung (default 2)")
    p.add_argument("--perturbation-interval", type=int, default=d.perturbation_interval, help="PBT: steps "
                   "between exploit/explore; trials checkpoint at this interval (default 4)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random search (default 0)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="base config overrides")


def cmd_tune(args) -> int:
    if args.resume:
        summary = resume_sweep(args.resume, args.address)
    else:
        opts = SweepOptions(num_samples=args.num_samples, concurrency=args.concurrency, max_steps=args.max_steps,
                            time_budget_s=args.time_budget_s, scheduler=args.scheduler, metric=args.metric,
                            mode=args.mode, grace_period=args.grace_period, reduction_factor=args.reduction_factor,
                            perturbation_interval=args.perturbation_interval, seed=args.seed)
        summary = run_sweep(args.config, args.space, opts, args.out, args.overrides, args.address)
    return 130 if summary.get("interrupted") else 0


def register_cli(sub) -> None:
    """Add `tune` to the `rlpipe` subcommands."""
    p = sub.add_parser("tune", help="hyperparameter sweep with Ray Tune (ASHA or PBT), recorded in MLflow")
    add_arguments(p)
    p.set_defaults(fn=cmd_tune)


def main(argv: Optional[list] = None) -> int:
    """`python -m tuning.sweep ...` = `rlpipe tune ...` (for `ray job submit` without installing)."""
    from actors.cli import main as rlpipe_main

    return rlpipe_main(["tune", *(sys.argv[1:] if argv is None else argv)], extra_commands={"tune": register_cli})


if __name__ == "__main__":
    sys.exit(main())
