"""The training loop: sample -> generate -> score -> reference/values -> advantages -> update -> sync
weights -> log, with evaluation and checkpoints. Synchronous by default; with rollout.max_staleness = s > 0
the next s batches are already generating while a step scores and updates (asynchronous rollouts: samples
at most s policy versions old, corrected by truncated importance weights in the learner).

`Trainer.step` is the whole algorithm on one screen; each stage is a short method with its own timer. All
remote calls of a stage are submitted first and gathered once. The learners are one `LearnerGroup`; the
weights' way to the generators is `WeightSync`'s.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import deque

import ray
import torch

from actors.learner_group import LearnerGroup
from actors.resilient import ShardCall, collect, gather, submit
from actors.weight_sync import WeightSync
from pipeline.algorithms.advantages import AdvantageInputs, compute_advantages, place_sequence_reward
from pipeline.algorithms.core import kl_penalty, masked_mean
from pipeline.batch import Rollout, TrainBatch, concat_rollouts, split_indices
from pipeline.config import RunConfig, learner_reference, learners_sharded, pi_old_source
from pipeline.rewards.functions import RewardFailure, RunningMoments, merge_scored_shards, shape_scores

REPORT_FAILED_SHARE = 0.1     # a step with this share of failed samples prints the failure


class StageTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


EVAL_SEED_OFFSET = 10 ** 9     # held-out sampling draws seeds no training step uses


class Trainer:
    def __init__(self, cfg: RunConfig, pools, train_table, eval_table, tracker, console):
        from pipeline.data.prompt_table import PromptSampler

        self.cfg, self.pools, self.tracker, self.console = cfg, pools, tracker, console
        self.sampler = PromptSampler(train_table, cfg.rollout.prompts_per_step, cfg.data.seed)
        self.extra_columns = [c for c in train_table.column_names if c != cfg.data.prompt_column]
        # by reward: an environment's episodes, or sampled completions of held-out rows without an answer column
        self.eval_by_reward = bool(cfg.env.name) or (eval_table is not None and "answer" not in eval_table.column_names)
        self.eval_rows = self._eval_rows(eval_table)
        self.eval_key = "eval/success" if self.eval_by_reward else "eval/accuracy"     # evaluate()'s headline figure
        self.eval_metrics: dict[str, float] = {}                                 # the last evaluation's others
        self.learners = LearnerGroup(pools.learners, learners_sharded(cfg))
        self.weights = WeightSync(cfg, self.learners, pools.generators, self._gather)
        self.learner_reference = learner_reference(cfg)     # LoRA: log pi_ref from the base, adapters off
        # (rows, sampler state before them, submitted generation, policy version at submission), oldest first
        self.in_flight: deque = deque()
        self.step_count = 0
        self.elapsed_s = 0.0               # training seconds, carried across resumes
        self.resent_shards = 0             # shards resent after an actor died, over the whole run
        self.last_batch: TrainBatch | None = None
        self.reward_moments = RunningMoments() if cfg.reward.normalize else None
        self.reported_reward_errors: set[str] = set()    # functions whose first failure was printed
        self.all_failed_steps = 0                         # steps in a row where every sample's reward failed

    def _eval_rows(self, table):
        if table is None:
            return None
        if self.eval_by_reward:                # episodes: whole rows, as the environment's reset takes them
            return table.to_pylist()
        return table.column(self.cfg.data.prompt_column).to_pylist(), [str(a) for a in table.column("answer").to_pylist()]

    @property
    def version(self) -> int:
        """The policy version the generators hold (one learner update per step)."""
        return self.weights.version

    # ------------------------------------------------------------------------------------ the step
    def step(self) -> dict[str, float]:
        t = StageTimer()
        with t("sample"):           # B prompt rows from the pool, in a resumable order
            self.submit_ahead(self.cfg.rollout.max_staleness + 1)
        with t("generate"):         # G completions per prompt, prompts sharded over the generators
            rows, rollout = self.next_rollout()    # async: the s batches still in flight generate meanwhile
        staleness = {"policy/staleness": float(self.version - rollout.policy_version)}
        with t("score"):            # sequence rewards, completions sharded over the scorers
            batch, reward_stats = self.score(rollout, rows)
        with t("reference"):        # values, pi_old (when recomputed) and frozen log-probs, in parallel
            ref_stats = self.reference_and_values(batch)
        with t("advantages"):       # token rewards (KL in reward) and the configured estimator
            self.advantages(batch)
        with t("update"):           # epochs x minibatches on the K data-parallel learners
            stats = self.learners.update(batch)
        with t("sync"):             # new weights to every generator, version and checksum checked
            sync = self.weights.sync()
        self.step_count += 1
        self.last_batch = batch
        return self.metrics(rollout, {**reward_stats, **ref_stats, **stats, **sync, **staleness}, t.seconds)

    # ------------------------------------------------------------------------------------ stages
    def submit_ahead(self, depth: int) -> None:
        """Draw prompt rows and submit their generation until `depth` batches are in flight. Each generator
        runs its calls in order, so a batch submitted before a weight sync is sampled by the weights before
        it: with rollout.max_staleness = s, s batches generate while the learners update (asynchronous);
        s = 0 submits each batch only when its step starts (the synchronous loop)."""
        while len(self.in_flight) < depth:
            before = self.sampler.state_dict()           # a checkpoint resumes from the oldest batch in flight
            rows = self.sampler.next_batch()
            calls = self.generation_calls(rows, self.step_count + len(self.in_flight))
            self.in_flight.append((rows, before, submit(calls), self.version))

    def next_rollout(self) -> tuple[list[dict], Rollout]:
        """The oldest batch in flight, collected. Shards of a generator that died mid-call are regenerated by
        `collect`; so is a shard generated by older weights than the ones it was submitted under: its
        generator was restarted while idle and ran it on its initial weights before a sync could reach it."""
        rows, _, submitted, submitted_version = self.in_flight.popleft()
        results, resent = collect(submitted, self.weights.restore_generator)
        older = [i for i, r in enumerate(results) if r.policy_version < submitted_version]
        if older:
            calls = [submitted.calls[i] for i in older]
            for call in calls:
                self.weights.restore_generator(call.actor)
            for i, result in zip(older, self._gather(calls, self.weights.restore_generator)):
                results[i] = result
            resent += len(older)
        self.resent_shards += resent
        # The staleness bound has one owner: the learner refuses a batch older than it (`PolicyLearner.update`).
        return rows, concat_rollouts(results, mixed_versions=self.cfg.rollout.max_staleness > 0)

    def generate(self, rows: list[dict]) -> Rollout:
        """G completions of each row now, by the generators' current weights (outside the step's pipeline)."""
        calls = self.generation_calls(rows, self.step_count)
        return concat_rollouts(self._gather(calls, self.weights.restore_generator))

    def generation_calls(self, rows: list[dict], step: int, samples: int | None = None) -> list[ShardCall]:
        """G (or `samples`) completions of each row, rows sharded over the generators; `step` seeds the sampling."""
        G, pc = samples or self.cfg.rollout.samples_per_prompt, self.cfg.data.prompt_column
        calls = []
        for gen, prompt_range in zip(self.pools.generators, split_indices(len(rows), len(self.pools.generators))):
            if not prompt_range:
                continue
            groups = [b for b in prompt_range for _ in range(G)]
            index = [b * G + g for b in prompt_range for g in range(G)]         # global sequence position
            if self.cfg.env.name:          # one episode of the environment per sample, on the whole row
                calls.append(ShardCall(gen, "generate_episodes", ([rows[b] for b in groups], groups, index, step)))
                continue
            prompts = [rows[b][pc] for b in groups]                             # (n,) each prompt G times
            calls.append(ShardCall(gen, "generate", (prompts, groups, index, step)))
        return calls

    def score(self, rollout: Rollout, rows: list[dict]) -> tuple[TrainBatch, dict[str, float]]:
        """Every sample scored exactly once, by the reward functions on the dataset's prompt (text or
        messages, as in the file) and its columns; `reward.on_failure=drop` then removes failed samples.
        Episodes of an environment come scored by it (`score_episodes`)."""
        if rollout.token_rewards is not None:
            return score_episodes(rollout)
        N = len(rollout.prompts)
        scored = self.score_samples(rows, rollout, self.cfg.rollout.samples_per_prompt)
        scores, failed = torch.tensor(scored.scores, dtype=torch.float32), torch.tensor(scored.failed)
        shaped = shape_scores(scores, failed, self.reward_moments, self.cfg.reward.clip)
        batch = TrainBatch(rollout=rollout, scores=shaped, score_failed=failed)
        stats = _reward_stats(scores, failed, rollout.group_ids)
        if shaped is not scores:       # what the advantages see, after normalising / clipping
            stats["reward/shaped_mean"] = shaped.mean().item()
        self.report_reward_failures(scored.errors, int(failed.sum()), N)
        if len(scored.per_function) > 1:   # one function: its mean is reward/mean
            for name, values in scored.per_function.items():
                ok = [v for v in values if v is not None]
                if ok:
                    stats[f"reward/fn/{name}"] = sum(ok) / len(ok)
        if self.cfg.reward.on_failure == "drop" and failed.any():
            batch = batch.keep_rows(~failed)
            stats["reward/dropped"] = int(failed.sum())
        return batch, stats

    def score_samples(self, rows: list[dict], rollout: Rollout, G: int):
        """The rollout's completions (G per row, in order) scored on the scorers, shards resent if one dies;
        raises unless each sample was scored exactly once. -> ScoredShard of the whole rollout."""
        N, pc = len(rollout.prompts), self.cfg.data.prompt_column
        prompts = [rows[i // G][pc] for i in range(N)]
        columns = {c: [rows[i // G][c] for i in range(N)] for c in self.extra_columns if c in rows[0]}
        calls = [ShardCall(scorer, "score_shard", (list(r), prompts[r.start:r.stop], rollout.completions[r.start:r.stop],
                                                   {c: v[r.start:r.stop] for c, v in columns.items()}))
                 for scorer, r in zip(self.pools.scorers, split_indices(N, len(self.pools.scorers))) if r]
        return merge_scored_shards(N, self._gather(calls))

    def report_reward_failures(self, errors: dict[str, str], failed: int, n: int) -> None:
        """Print a function's first failure once, when at least `REPORT_FAILED_SHARE` of a step's samples
        failed; raise `RewardFailure` when every sample failed `reward.max_failed_steps` steps in a row."""
        if failed >= REPORT_FAILED_SHARE * n:
            for name, error in errors.items():
                if name not in self.reported_reward_errors:
                    self.reported_reward_errors.add(name)
                    print(f"reward: {failed} of step {self.step_count + 1}'s {n} samples failed "
                          f"(reward/failed); {name} first failed with: {error}", flush=True)
        self.all_failed_steps = self.all_failed_steps + 1 if failed == n else 0
        limit = self.cfg.reward.max_failed_steps
        if self.all_failed_steps >= limit:
            first = "; ".join(f"{k}: {v}" for k, v in errors.items()) or "every function returned None"
            raise RewardFailure(f"every sample's reward failed for {limit} steps in a row ({first}); fix the reward "
                                f"function and resume with --resume, or raise reward.max_failed_steps")

    def reference_and_values(self, batch: TrainBatch) -> dict[str, float]:
        """Rollout-time values and (from a learner pass) pi_old from the learners, log pi_ref from the reference
        (or, in a LoRA run, from the learner's base): submitted together, gathered once. Where pi_old comes
        from is decided here, once (`pi_old_source`); the learner switches on `batch.pi_old`."""
        r = batch.rollout
        batch.pi_old = pi_old_source(self.cfg, batch.num_sequences)
        if batch.num_sequences == 0:
            return {}
        refs = [self.learners.submit_rollout_forward(r, batch.pi_old == "learner", self.learner_reference)]
        if self.pools.reference is not None:
            refs.append(self.pools.reference.logprobs.remote(r))
        learned, *ref = ray.get(refs)
        batch.values = learned["values"]
        batch.ref_logprobs = ref[0] if ref else learned["ref_logprobs"]
        if batch.pi_old != "learner":          # "update": the update logs the sampler's gap itself
            return {}
        batch.old_logprobs = learned["old_logprobs"]
        # How far the sampler's log-probs were from the learner's (bf16 decode vs full forward, an engine).
        gap = (batch.old_logprobs - r.logprobs).abs()
        return {"policy/sampler_logprob_gap": masked_mean(gap, r.train_mask).item()}

    def advantages(self, batch: TrainBatch) -> None:
        a, r = self.cfg.algorithm, batch.rollout
        mask = r.train_mask
        token_rewards = (place_sequence_reward(batch.scores, mask) if r.token_rewards is None  # (N, T)
                         else r.token_rewards)                 # an environment's: each turn's on its last token
        penalty = None                                                                  # (N, T) KL in reward
        if a.kl_in_reward and batch.ref_logprobs is not None:
            penalty = -a.kl_coef * kl_penalty(batch.pi_old_logprobs, batch.ref_logprobs, a.kl_estimator) * mask
        if batch.num_sequences == 0:
            batch.advantages = batch.returns = token_rewards
            return
        batch.advantages, batch.returns = compute_advantages(a.name, AdvantageInputs(
            token_rewards=token_rewards, mask=mask, group_ids=r.group_ids, values=batch.values,
            gamma=a.gamma, lam=a.lam, scale_by_std=a.scale_by_std, token_penalty=penalty))

    def evaluate(self) -> float | None:
        """Greedy exact match on the held-out prompts, sharded over the generators; by reward, the held-out
        episodes' success rate (`evaluate_episodes`), or without an environment the sampled completions'
        (`evaluate_samples`, rows without an answer column)."""
        if self.eval_rows is None:
            return None
        if self.eval_by_reward:
            return self.evaluate_episodes() if self.cfg.env.name else self.evaluate_samples()
        prompts, answers = self.eval_rows
        max_new = self.cfg.rollout.eval_max_new_tokens or self.cfg.rollout.max_new_tokens
        gens = self.pools.generators
        calls = [ShardCall(g, "count_correct", (prompts[s.start:s.stop], answers[s.start:s.stop], max_new))
                 for g, s in zip(gens, split_indices(len(prompts), len(gens)))]
        return sum(self._gather(calls, self.weights.restore_generator)) / len(prompts)

    def evaluate_episodes(self) -> float:
        """env.eval_samples episodes of each held-out row, rows sharded over the generators -> eval/success; the
        mean reward, pass@k, turns and stop reasons go to `eval_metrics`."""
        from pipeline.rollout.agent import episode_eval_metrics

        rows, gens, env = self.eval_rows, self.pools.generators, self.cfg.env
        calls = [ShardCall(g, "evaluate_episodes", (rows[s.start:s.stop], env.eval_samples, self.step_count))
                 for g, s in zip(gens, split_indices(len(rows), len(gens))) if s]
        per_row = [row for shard in self._gather(calls, self.weights.restore_generator) for row in shard]
        self.eval_metrics = episode_eval_metrics(per_row, env.success_reward)
        return self.eval_metrics.pop("eval/success")

    def evaluate_samples(self) -> float:
        """A single-turn run's held-out rows without an answer: env.eval_samples completions of each, sampled as
        training samples are and scored by the scorers (reward functions and models, unshaped) -> eval/success,
        eval/pass_at_<k> and eval/mean_reward (`episode_eval_metrics`, each completion a one-turn episode)."""
        from pipeline.rollout.agent import episode_eval_metrics

        k, rows = self.cfg.env.eval_samples, self.eval_rows
        rollout = concat_rollouts(self._gather(self.generation_calls(rows, EVAL_SEED_OFFSET + self.step_count, k),
                                               self.weights.restore_generator))
        scored = self.score_samples(rows, rollout, k)
        lengths = rollout.completion_mask.sum(1).tolist()
        samples = [(None if failed else score, "length" if n >= self.cfg.rollout.max_new_tokens else "stop", 1, 0)
                   for score, failed, n in zip(scored.scores, scored.failed, lengths)]
        self.eval_metrics = episode_eval_metrics([samples[i * k:(i + 1) * k] for i in range(len(rows))],
                                                 self.cfg.env.success_reward)
        return self.eval_metrics.pop("eval/success")

    def _gather(self, calls: list[ShardCall], restore=None) -> list:
        """All results in order; shards of actors that died mid-call are resent to the restarted actor."""
        results, resent = gather(calls, restore)
        self.resent_shards += resent
        return results

    # ------------------------------------------------------------------------------------ metrics
    def metrics(self, rollout: Rollout, stats: dict, seconds: dict) -> dict[str, float]:
        mask = rollout.train_mask
        step_s = sum(seconds.values())
        # asynchronous: generation overlaps the step, so its tokens count against the step's seconds
        generate_s = step_s if self.cfg.rollout.max_staleness else seconds["generate"]
        m = {
            "completion/length": mask.sum(1).float().mean().item(),
            "throughput/tokens_per_s": int(mask.sum()) / max(generate_s, 1e-9),
            "throughput/samples_per_s": len(rollout.prompts) / max(step_s, 1e-9),
            "time/step_s": step_s, "policy/version": self.version, "fault/resent_shards": self.resent_shards,
        }
        if self.last_batch is not None and self.last_batch.num_sequences:
            m["advantage/mean"] = masked_mean(self.last_batch.advantages, self.last_batch.rollout.train_mask).item()
        m.update({f"time/{k}_s": v for k, v in seconds.items()})
        m.update(stats)
        return m

    def samples(self) -> list[dict]:
        """The last step's rollouts as rows (prompt, completion, reward), for the Parquet artifact."""
        b = self.last_batch
        if b is None:
            return []
        return [{"step": self.step_count, "prompt": p, "completion": c, "reward": s}
                for p, c, s in zip(b.rollout.prompts, b.rollout.completions, b.scores.tolist())]

    # ------------------------------------------------------------------------------------ checkpoints
    def save(self, run_dir: str) -> str:
        from pipeline.checkpoint import capture_rng_state, save_checkpoint

        models, optimizers = self.learners.state()
        # Batches still generating are not part of the checkpoint: a resume draws and generates them again.
        sampler = self.in_flight[0][1] if self.in_flight else self.sampler.state_dict()
        extra = {"step": self.step_count, "policy_version": self.version, "elapsed_s": self.elapsed_s,
                 "sampler": sampler, "mlflow_run_id": self.tracker.run_id}
        if self.reward_moments is not None:
            extra["reward_moments"] = self.reward_moments.state_dict()
        return save_checkpoint(os.path.join(run_dir, "checkpoints"), self.step_count, models=models,
                               optimizers=optimizers, rng=capture_rng_state(), extra=extra,
                               keep_last=self.cfg.checkpoint.keep_last)

    def restore(self, ckpt) -> None:
        from pipeline.checkpoint import restore_rng

        version = ckpt.extra["policy_version"]
        self.learners.load_state(ckpt.models, ckpt.optimizers, version)
        self.step_count = ckpt.extra["step"]
        self.elapsed_s = ckpt.extra.get("elapsed_s", 0.0)
        self.sampler.load_state_dict(ckpt.extra["sampler"])
        self.in_flight.clear()
        if self.reward_moments is not None and "reward_moments" in ckpt.extra:
            self.reward_moments.load_state_dict(ckpt.extra["reward_moments"])
        if ckpt.rng:
            restore_rng(ckpt.rng)
        self.weights.resume(version)


def score_episodes(rollout: Rollout) -> tuple[TrainBatch, dict[str, float]]:
    """Episodes come scored by their environment: the score is the sum of an episode's turn rewards. A
    placeholder (its environment raised or timed out) is dropped, so it joins neither the loss nor its group's
    statistics (a partial group still trains; a group of one has advantage 0). -> (batch, env/ and reward/ stats)."""
    from pipeline.rollout.agent import FAILED_STOPS, STOP_REASONS

    scores = rollout.token_rewards.sum(1)                                          # (N,)
    failed = torch.tensor([s in FAILED_STOPS for s in rollout.stop_reasons])
    N, counts = len(scores), rollout.episode_counts.float()
    stats = {**_reward_stats(scores, failed, rollout.group_ids), "env/turns": counts[:, 0].mean().item(),
             "env/tool_calls": counts[:, 1].mean().item(), "env/tool_errors": counts[:, 2].mean().item()}
    stats.update({f"env/stop/{reason}": sum(s == reason for s in rollout.stop_reasons) / N for reason in STOP_REASONS})
    batch = TrainBatch(rollout=rollout, scores=scores, score_failed=failed)
    if failed.any():
        batch = batch.keep_rows(~failed)
        stats["reward/dropped"] = int(failed.sum())
    return batch, stats


def _reward_stats(scores: torch.Tensor, failed: torch.Tensor, group_ids: torch.Tensor) -> dict[str, float]:
    """A step's reward figures from (N,) scores, (N,) failed flags and (N,) group ids."""
    return {"reward/mean": scores.mean().item(), "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
            "reward/failed": int(failed.sum()), "reward/solved_groups": _solved_fraction(scores, group_ids)}


def _solved_fraction(scores: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Share of prompts with at least one sample scoring the step's best possible 1.0 or more (for 0/1
    verifiers: the groups that give GRPO any signal)."""
    best = torch.full((int(group_ids.max()) + 1,), -float("inf")).scatter_reduce(0, group_ids, scores, "amax")
    return (best >= 1.0).float().mean().item()
