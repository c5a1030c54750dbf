"""Experiment tracking: an MLflow run per training job, and a one-line-per-step console log.

`Tracker` talks to MLflow only through `MlflowClient` (never the fluent `mlflow.start_run` globals), so
several trackers can live in one process -- a driver with nested child runs, or Tune trials.

Resuming: `Tracker(resume_run_id=...)` re-opens a run and reads back its metric history. A job that
restarts from its last checkpoint repeats the steps after that checkpoint; `log_metrics` skips every
step <= the last one already in the run, so MLflow holds each step exactly once (the first attempt's
values, which are the ones the plotted curve already showed).

Local stores: with a `sqlite:///` tracking URI and no server, MLflow would put artifacts in `./mlruns` of
whatever directory the process runs from. A new experiment therefore gets `<run_dir>/mlartifacts` as its
artifact location. An experiment that already exists keeps the location it was created with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger(__name__)

PARAM_VALUE_MAX_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3.x
PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
_TRUNCATION_NOTE = "...[truncated]"


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    """`$MLFLOW_TRACKING_URI` if set, else a sqlite store inside the run directory."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def flatten_config(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> flat MLflow params: `{"algorithm": {"clip_range": 0.2}}` -> `{"algorithm.clip_range": "0.2"}`.

    Lists and tuples become JSON; values longer than MLflow's 6000-char param limit are cut and marked.
    """
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name))
            continue
        if isinstance(value, (list, tuple, dict)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        flat[name] = _truncate_param(text)
    return flat


def _truncate_param(text: str) -> str:
    if len(text) <= PARAM_VALUE_MAX_CHARS:
        return text
    return text[: PARAM_VALUE_MAX_CHARS - len(_TRUNCATION_NOTE)] + _TRUNCATION_NOTE


class Tracker:
    """One MLflow run: params, per-step metrics (each step once), artifacts, sample tables.

    Usable as a context manager: the run ends FINISHED, or FAILED when the block raises
    (KILLED on KeyboardInterrupt).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        experiment: str = "rlpipe",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        from mlflow import MlflowClient  # lazy: importing mlflow costs ~3 s

        # "Creating initial MLflow database tables..." on every new store: nothing to act on.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri or default_tracking_uri(self.run_dir)
        self.client = MlflowClient(self.tracking_uri)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.last_logged_step = -1  # steps <= this are already in the run
        self.nonfinite_counts: dict[str, int] = {}  # metric key -> how many NaN/inf values were dropped
        self._finished = False

        if resume_run_id is not None:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            if tags:
                self._log_tags(tags)
            self._load_history()
        else:
            experiment_id = self._get_or_create_experiment(experiment)
            run_tags = dict(tags or {})
            if parent_run_id is not None:
                run_tags["mlflow.parentRunId"] = parent_run_id  # what the MLflow UI nests runs by
            run = self.client.create_run(experiment_id, tags=run_tags, run_name=run_name)
            self.run_id = run.info.run_id
        self.experiment_id = self.client.get_run(self.run_id).info.experiment_id

    # -- setup -----------------------------------------------------------------------------------

    def _get_or_create_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        artifact_location = None  # a tracking server decides where artifacts go
        if self.tracking_uri.startswith("sqlite:///"):
            # Artifacts live beside the database, so one store shared by several runs stays one folder.
            db_path = Path(self.tracking_uri[len("sqlite:///"):]).resolve()
            artifact_location = (db_path.parent / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            # Another tracker (a parallel Tune trial) created it between our lookup and create.
            existing = self.client.get_experiment_by_name(name)
            if existing is None:
                raise
            return existing.experiment_id

    def _load_history(self) -> None:
        run = self.client.get_run(self.run_id)
        for key in run.data.metrics:
            points = sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))
            self.history[key] = points
            if points:
                self.last_logged_step = max(self.last_logged_step, points[-1][0])

    def _log_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # -- logging ---------------------------------------------------------------------------------

    def log_params(self, flat: dict[str, Any]) -> None:
        """Log flat params (see `flatten_config`) in batches of 100.

        MLflow params are immutable. On a resumed run, params already logged with the same value are
        skipped; a changed value is kept as it was and reported in a warning rather than failing the job.
        """
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        params = []
        for key, value in flat.items():
            text = _truncate_param(str(value))
            if key in existing:
                if existing[key] != text:
                    logger.warning("param %r already logged as %r; ignoring new value %r", key, existing[key], text)
                continue
            params.append(Param(key, text))
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + PARAMS_PER_BATCH])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> bool:
        """Log one step's metrics. Returns False (and logs nothing) when the step is already in the run.

        Non-finite values (a NaN loss from an empty mask, an inf ratio) are dropped and counted in
        `nonfinite_counts`, so one bad value never kills a long run.
        """
        from mlflow.entities import Metric

        if step <= self.last_logged_step:
            return False
        timestamp_ms = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            value = float(value)
            if not math.isfinite(value):
                self.nonfinite_counts[key] = self.nonfinite_counts.get(key, 0) + 1
                if self.nonfinite_counts[key] == 1:
                    logger.warning("metric %r is %s at step %d; dropping non-finite values", key, value, step)
                continue
            batch.append(Metric(key, value, timestamp_ms, step))
            self.history.setdefault(key, []).append((step, value))
        for start in range(0, len(batch), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[start : start + METRICS_PER_BATCH])
        self.last_logged_step = step
        return True

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict_as_yaml(self, d: dict, name: str) -> None:
        """Log a dict as `<name>` (a `.yaml` suffix is added when missing)."""
        self.client.log_dict(self.run_id, d, name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")

    def log_table(self, rows: "list[dict] | Any", name: str) -> None:
        """Log rows (a list of dicts or a `pyarrow.Table`) as `samples/<name>.parquet`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
        filename = name if name.endswith(".parquet") else f"{name}.parquet"
        with tempfile.TemporaryDirectory(dir=self.run_dir) as tmp:
            local = os.path.join(tmp, filename)
            pq.write_table(table, local)
            self.client.log_artifact(self.run_id, local, "samples")

    # -- end of run ------------------------------------------------------------------------------

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED. Calling it again does nothing."""
        if self._finished:
            return
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        self.client.set_terminated(self.run_id, status=status)
        self._finished = True
        if self.nonfinite_counts:
            logger.warning("dropped non-finite metric values: %s", self.nonfinite_counts)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, `ray job stop`
            self.finish("KILLED")
        else:
            self.finish("FAILED")


def format_duration(seconds: float) -> str:
    """4h02m, 4m12s, 35s."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ConsoleLog:
    """Prints one line per step with the figures a person watches, e.g.

    `step  12/200 | reward 0.41±0.49 | eval 57.2% | kl 0.003 | clip 0.02 | 1.9 s/step (gen 0.8 score 0.1
    ref 0.1 upd 0.8 sync 0.05) | 2,300 tok/s | eta 4m12s`

    Missing keys are left out. `eval/accuracy` is a fraction in [0, 1], shown in percent. The eta comes
    from wall-clock time per step since the first logged step (so eval and checkpoint time count), and
    is the sooner of "steps left" and "time budget left" when both are given.
    """

    _TIMERS = (("gen", "time/generate_s"), ("score", "time/score_s"), ("ref", "time/reference_s"),
               ("upd", "time/update_s"), ("sync", "time/sync_s"))

    def __init__(self, total_steps: int | None = None, time_budget_s: float | None = None,
                 stream: TextIO | None = None):
        self.total_steps = total_steps
        self.time_budget_s = time_budget_s
        self.stream = stream
        self._start_time = time.monotonic()
        self._first: tuple[int, float] | None = None  # (step, time) of the first line printed

    def format(self, step: int, metrics: dict[str, float], now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        m = metrics
        if self.total_steps:
            width = len(str(self.total_steps))
            parts = [f"step {step:>{width}}/{self.total_steps}"]
        else:
            parts = [f"step {step}"]
        if "reward/mean" in m:
            std = f"±{m['reward/std']:.2f}" if "reward/std" in m else ""
            parts.append(f"reward {m['reward/mean']:.2f}{std}")
        if m.get("reward/failed"):
            parts.append(f"failed {m['reward/failed']:.0f}")
        if m.get("eval/accuracy") is not None:
            parts.append(f"eval {100 * m['eval/accuracy']:.1f}%")
        if m.get("eval/success") is not None:
            parts.append(f"eval success {100 * m['eval/success']:.1f}%")
        if "policy/kl" in m:
            parts.append(f"kl {m['policy/kl']:.3g}")
        if "policy/clip_frac" in m:
            parts.append(f"clip {m['policy/clip_frac']:.2g}")
        if "time/step_s" in m:
            timers = " ".join(f"{short} {m[key]:.2g}" for short, key in self._TIMERS if key in m)
            parts.append(f"{m['time/step_s']:.2g} s/step" + (f" ({timers})" if timers else ""))
        if "throughput/tokens_per_s" in m:
            parts.append(f"{m['throughput/tokens_per_s']:,.0f} tok/s")
        eta = self._eta_s(step, m, now)
        if eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    def _eta_s(self, step: int, m: dict[str, float], now: float) -> float | None:
        etas = []
        if self.total_steps:
            if self._first is not None and step > self._first[0]:
                per_step_s = (now - self._first[1]) / (step - self._first[0])
            else:
                per_step_s = m.get("time/step_s")
            if per_step_s is not None:
                etas.append(max(0, self.total_steps - step) * per_step_s)
        if self.time_budget_s is not None:
            etas.append(max(0.0, self.time_budget_s - (now - self._start_time)))
        return min(etas) if etas else None

    def log(self, step: int, metrics: dict[str, float]) -> str:
        now = time.monotonic()
        line = self.format(step, metrics, now)
        if self._first is None:
            self._first = (step, now)
        stream = self.stream or sys.stdout  # looked up late so pytest's capsys and redirects work
        print(line, file=stream, flush=True)
        return line
