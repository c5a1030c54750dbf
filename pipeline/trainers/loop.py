"""The loop every supervised-style trainer shares (SFT, reward models): steps, held-out evaluation, early
stopping with the best weights restored, checkpoints and exact resume, MLflow metrics, progress lines.

A trainer brings its objective through a small interface (`SupervisedTrainer` in `pipeline.trainers.sft`,
`RewardModelTrainer` in `pipeline.trainers.reward_model`):

    train_step() -> {"loss": ...}          one optimizer step on the next minibatch
    evaluate() -> {"eval/...": ...}        held-out metrics of the current weights
    score(metrics) -> float                the early-stopping figure, higher is better
    state() -> (models, optimizers)        what a checkpoint holds (engine + data order), as tensors
    load_state(models, optimizers)
    weights() / load_weights(state)        a copy of the model's weights (the best ones are kept), and back
    save_model(out_dir)                    the trained model as a Hugging Face folder
    close()                                release what the trainer holds (processes of its learners)

`EngineTrainer` implements all but the objective, for one process or as rank `rank` of `world_size`
data-parallel learners: each rank takes its share of every minibatch (`my_rows`), weighs its loss by that
share of the whole, and the engine sums gradients over the group, so K learners take the step one takes.
`actors.supervised` runs K of them as Ray actors behind this same interface.

Time spent evaluating counts toward `time_budget_s`: it is part of what a run costs.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch


class ShuffledRows:
    """Minibatches of row indices drawn without replacement from a seeded shuffle, reshuffled each epoch (the
    leftover rows of an epoch come first); `state()` / `load_state()` make a resumed run draw the same rows."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if len(self.order) < self.batch_size:
            self.order = torch.cat([self.order, torch.randperm(self.n, generator=self.generator)])
        index, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return index

    def state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "order": self.order.clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].long()


class EngineTrainer:
    """What the supervised-style trainers share around their objective: a `TrainEngine` (`self.engine`) on
    `self.model`, a `ShuffledRows` (`self.rows`, the same order on every rank), the step count; checkpoint
    state, weights and the saved folder."""

    engine: "object"
    rows: ShuffledRows
    step_count: int

    def _start(self, model, tokenizer, rank: int = 0, world_size: int = 1,
               group: Callable[[], Optional[object]] = lambda: None, **engine_options) -> None:
        """Hold model and tokenizer, and the engine (options as `TrainEngine` takes them, LoRA included) on the
        model's device. rank / world_size / group: this learner's place among data-parallel learners and their
        process group (looked up at each step: learners join it after they are built)."""
        from pipeline.trainers.engine import TrainEngine

        self.model, self.tokenizer = model, tokenizer
        self.rank, self.world_size = rank, world_size
        self.device = next(model.parameters()).device
        self.engine = TrainEngine(model, device=str(self.device), group=group, **engine_options)
        self.step_count = 0

    def step_shares(self, index: torch.Tensor) -> dict:
        """What `TrainEngine.train_step` needs beyond this rank's rows for a minibatch `index`: the most rows a
        rank holds, and a stand-in row for a sharded rank's padding passes."""
        return {"most": -(-len(index) // self.world_size), "stand_in": index[:1]}

    def my_rows(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's consecutive share of a minibatch's row indices (all of them on a single learner)."""
        return index.tensor_split(self.world_size)[self.rank] if self.world_size > 1 else index

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def weights(self) -> Optional[dict[str, torch.Tensor]]:
        """A float32 copy of the weights the model computes with (`TrainEngine.weights`)."""
        return self.engine.weights()

    def load_weights(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load `state` (strict=False: a saved folder's, which lists tied weights once)."""
        self.engine.load_weights(state, strict)

    def close(self) -> None:
        """Nothing to release in one process."""

    @property
    def skipped_steps(self) -> int:
        return self.engine.skipped_steps

    def state(self) -> tuple[dict, dict]:
        models, optimizers = self.engine.state("model")
        models["data_order"] = {**self.rows.state(), "step": torch.tensor(self.step_count)}
        return models, optimizers

    def load_state(self, models: dict, optimizers: dict) -> None:
        self.engine.load_state("model", models, optimizers)
        self.rows.load_state(models["data_order"])
        self.step_count = int(models["data_order"]["step"])

    def save_model(self, out_dir) -> Optional[str]:
        """The model as a Hugging Face folder in float32 (LoRA: merged); sharded, rank 0 writes it."""
        return self.engine.save_hf(out_dir, self.tokenizer, dtype="float32")


def train_loop(trainer, *, eval_every: int, max_steps: Optional[int] = None,
               time_budget_s: Optional[float] = None, patience: Optional[int] = None,
               run_dir: Optional[str] = None, checkpoint_every: int = 0, resume: bool = False,
               tracker=None, log: Callable[[str], None] = print) -> dict:
    """Train until `max_steps`, `time_budget_s`, or (with `patience`) that many evaluations in a row without
    a new best; evaluate at step 0, every `eval_every` steps and at the end. With patience the best weights
    are restored at the end (early stopping); without, the final weights stay.

    run_dir: with it, checkpoints go to run_dir/checkpoints every `checkpoint_every` steps (and at the end)
    and the best weights so far to run_dir/best (a Hugging Face folder, replaced atomically), so a run killed
    at any point resumes (`resume=True`) from its last checkpoint with the same data order, best and curve.
    tracker: a `pipeline.tracking.Tracker`; every evaluation and the mean train loss are logged to it.
    Returns {"best_score", "best_step", "best_metrics", "final_metrics", "kept_metrics" (those of the weights
    the model holds now), "curve": [(step, seconds, metrics)],
    "steps", "seconds", "skipped_steps"}.
    """
    if max_steps is None and time_budget_s is None and patience is None:
        raise ValueError("train_loop needs max_steps, time_budget_s or patience to stop")
    run = _LoopState(trainer, run_dir, tracker, log)
    if resume:
        run.resume()                        # step, curve, best and data order from the last checkpoint
    if not run.curve:
        run.evaluate()                      # step 0
    stopped_early = False
    while not run.out_of_budget(max_steps, time_budget_s):
        run.train_step()
        checkpoint_due = bool(checkpoint_every) and run.step % checkpoint_every == 0
        if run.step % eval_every:
            if checkpoint_due:
                run.checkpoint()
            continue
        run.evaluate()
        if checkpoint_due:
            run.checkpoint()
        if patience is not None and run.evals_since_best() >= patience:
            stopped_early = True
            break
    return run.finish(patience, stopped_early)


class _LoopState:
    """What `train_loop` carries from step to step, and its stages: resume, evaluate (keeping the best
    weights), checkpoint, finish (restoring the best weights under early stopping)."""

    def __init__(self, trainer, run_dir: Optional[str], tracker, log: Callable[[str], None]):
        self.trainer, self.tracker, self.log = trainer, tracker, log
        self.checkpoints = Path(run_dir) / "checkpoints" if run_dir else None
        self.best_dir = Path(run_dir) / "best" if run_dir else None
        self.step, self.curve, self.losses, self.best = 0, [], [], {}
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def resume(self) -> None:
        from pipeline.checkpoint import latest_checkpoint, load_checkpoint, restore_rng

        if self.checkpoints is None or not latest_checkpoint(self.checkpoints):
            return
        ckpt = load_checkpoint(latest_checkpoint(self.checkpoints))
        self.trainer.load_state(ckpt.models, ckpt.optimizers)
        restore_rng(ckpt.rng)
        self.step = ckpt.step
        self.start = time.perf_counter() - ckpt.extra["seconds"]     # the time before the stop counts
        self.curve = [(s, t, m) for s, t, m in ckpt.extra["curve"]]
        self.best = dict(ckpt.extra["best"], state=None)             # its weights are in run_dir/best
        self.log(f"resumed at step {self.step} from {ckpt.path} (best {self.best['score']:.4g} at step "
                 f"{self.best['step']})")

    def out_of_budget(self, max_steps: Optional[int], time_budget_s: Optional[float]) -> bool:
        return ((max_steps is not None and self.step >= max_steps)
                or (time_budget_s is not None and self.elapsed() >= time_budget_s))

    def train_step(self) -> None:
        self.losses.append(self.trainer.train_step()["loss"])
        self.step += 1

    def evaluate(self) -> None:
        """Held-out metrics (with the mean train loss since the last evaluation), logged; a new best keeps
        its weights (and writes run_dir/best)."""
        metrics = self.trainer.evaluate()
        if self.losses:
            metrics["train/loss"] = float(np.mean(self.losses))
            self.losses.clear()
        self.curve.append((self.step, self.elapsed(), metrics))
        if self.tracker is not None:
            self.tracker.log_metrics(self.step, metrics)
        score = self.trainer.score(metrics)
        shown = "  ".join(f"{k} {_fmt(k, v)}" for k, v in metrics.items())
        self.log(f"step {self.step:5d}  {shown}  {self.elapsed():6.1f} s")
        if not self.best or score > self.best["score"]:
            self.best = {"score": score, "step": self.step, "metrics": metrics, "state": self.trainer.weights()}
            if self.best_dir is not None:
                self.trainer.save_model(self.best_dir)

    def evals_since_best(self) -> int:
        return sum(1 for s, _, _ in self.curve if s > self.best["step"])

    def checkpoint(self) -> None:
        from pipeline.checkpoint import capture_rng_state, save_checkpoint

        if self.checkpoints is None:
            return
        models, optimizers = self.trainer.state()
        save_checkpoint(self.checkpoints, self.step, models=models, optimizers=optimizers, rng=capture_rng_state(),
                        extra={"seconds": self.elapsed(), "curve": self.curve,
                               "best": {k: v for k, v in self.best.items() if k != "state"}})

    def finish(self, patience: Optional[int], stopped_early: bool) -> dict:
        """Score the final weights (if the budget ran out between evaluations), checkpoint, restore the best
        weights under early stopping, and the loop's result (see `train_loop`)."""
        if self.curve[-1][0] != self.step:
            self.evaluate()
        self.checkpoint()
        final_metrics, best = self.curve[-1][2], self.best
        if patience is not None and best["step"] != self.step:
            if best["state"] is not None:
                self.trainer.load_weights(best["state"])
            else:                                  # resumed: the best weights are the saved folder's
                from safetensors.torch import load_file

                self.trainer.load_weights(_folder_state(self.best_dir, load_file), strict=False)
        if stopped_early:
            self.log(f"early stop: no better held-out score in {patience} evaluations; best weights are step "
                     f"{best['step']}'s")
        return {"best_score": best["score"], "best_step": best["step"], "best_metrics": best["metrics"],
                "final_metrics": final_metrics,
                "kept_metrics": best["metrics"] if patience is not None else final_metrics,
                "curve": self.curve, "steps": self.step, "seconds": self.elapsed(),
                "skipped_steps": getattr(self.trainer, "skipped_steps", 0)}


def _folder_state(folder: Path, load_file) -> dict:
    """The tensors of every *.safetensors file in a Hugging Face folder, merged."""
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


def _fmt(key: str, value: float) -> str:
    return f"{100 * value:5.1f}%" if key.endswith("accuracy") else f"{value:.4f}"


__all__ = ["EngineTrainer", "ShuffledRows", "train_loop"]
