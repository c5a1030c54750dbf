"""The preference demo's task: a hidden judge, noisy preference pairs drawn from it, and the measurements
that show what PPO against a learned reward model did (true score, reward-model score, KL to the SFT policy).

The prompt is four distinct letters of "abcdefgh" then ">", e.g. "bdfa>"; a completion is a few letters. The
judge (`true_score`), which no training step ever calls, prefers completions made of the prompt's letters:
the share of up to `MAX_LEN` completion characters that occur in the prompt (a completion longer than
`MAX_LEN` scores 0). It needs the prompt to judge, as a human rater does. Its maximum is 1.0.

- demonstrations (SFT): 4-6 letters whose quality varies from response to response (each letter is one of
  the prompt's with a probability drawn per response, uniform in [0.4, 1]: better than chance, 0.5, on
  average, as a demonstrator is), so the SFT policy is mediocre (~0.52). With quality uniform in [0, 1] the
  demonstrations were at chance, the SFT policy (~0.41) had not learned to look at the prompt, and PPO had to
  learn that from the reward model alone (measured, mean true score of PPO's samples: 0.46 -> 0.62 over 200
  steps, where from an SFT policy that looks at the prompt 0.56 -> 0.83 against the same reward models);
- preference pairs: two responses per prompt, the one the judge scores higher is `chosen`; a share `flip` of
  the labels is swapped, as human labels are noisy. With 15% flipped, no model can agree with more than 85%
  of held-out labels: the noise ceiling. A share `any_length` of the pairs' responses has any length from 0
  to MAX_LEN + 2, the rest 4-6 letters as the demonstrations: a rater also sees empty, clipped and overlong
  answers, and without them the reward models never learn that short is bad (measured: PPO on seed 0
  collapsed to empty or one-letter completions the reward models scored highly).
"""
from __future__ import annotations

import random
from pathlib import Path

LETTERS = "abcdefgh"
MAX_LEN = 6


def true_score(prompts, completions, **_) -> list[float]:
    """The hidden judge: share of the completion's characters (up to MAX_LEN) found in the prompt's letters."""
    out = []
    for prompt, completion in zip(prompts, completions):
        letters, text = set(str(prompt).rstrip(">")), completion.strip()
        out.append(0.0 if len(text) > MAX_LEN else sum(ch in letters for ch in text) / MAX_LEN)
    return out


def _prompt(rng: random.Random) -> str:
    return "".join(rng.sample(LETTERS, 4)) + ">"


def _response(rng: random.Random, prompt: str, lengths: tuple[int, int] = (4, MAX_LEN),
              quality: tuple[float, float] = (0.0, 1.0)) -> str:
    """`lengths` (inclusive range) letters of varying quality: each is one of the prompt's letters with a
    probability drawn per response (uniform in `quality`), else one of the other four."""
    inside = prompt.rstrip(">")
    outside = [c for c in LETTERS if c not in inside]
    quality = quality[0] + (quality[1] - quality[0]) * rng.random()
    return "".join(rng.choice(inside) if rng.random() < quality else rng.choice(outside)
                   for _ in range(rng.randint(*lengths)))


def make_preference_task(out_dir, *, n_demos: int = 2000, n_pairs: int = 6000, n_eval_pairs: int = 600,
                         n_prompts: int = 20000, n_eval: int = 300, flip: float = 0.15, min_gap: float = 2 / MAX_LEN,
                         any_length: float = 1 / 3, demo_quality: tuple[float, float] = (0.4, 1.0),
                         seed: int = 0) -> dict:
    """Write demos.parquet (prompt, response), pairs.parquet and pairs_eval.parquet (prompt, chosen, rejected),
    prompts.parquet (the RL pool) and eval.parquet (held-out prompts). Pairs whose two responses the judge scores
    less than `min_gap` apart are redrawn: raters skip near-ties. Returns {name: path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def pairs(n: int) -> "pa.Table":
        rows = []
        while len(rows) < n:
            prompt = _prompt(rng)
            a, b = (_response(rng, prompt, (0, MAX_LEN + 2) if rng.random() < any_length else (4, MAX_LEN))
                    for _ in range(2))
            sa, sb = true_score([prompt, prompt], [a, b])
            if abs(sa - sb) < min_gap - 1e-9:     # a near-tie: raters skip those ("about the same")
                continue
            chosen, rejected = (a, b) if sa > sb else (b, a)
            if rng.random() < flip:
                chosen, rejected = rejected, chosen
            rows.append((prompt, chosen, rejected))
        p, c, r = zip(*rows)
        return pa.table({"prompt": list(p), "chosen": list(c), "rejected": list(r)})

    tables = {
        "demos": pa.table(dict(zip(("prompt", "response"), zip(*[
            (p, _response(rng, p, quality=demo_quality)) for p in (_prompt(rng) for _ in range(n_demos))])))),
        "pairs": pairs(n_pairs),
        "pairs_eval": pairs(n_eval_pairs),
        "prompts": pa.table({"prompt": [_prompt(rng) for _ in range(n_prompts)]}),
        "eval": pa.table({"prompt": [_prompt(rng) for _ in range(n_eval)]}),
    }
    paths = {}
    for name, table in tables.items():
        paths[name] = str(out / f"{name}.parquet")
        pq.write_table(table, paths[name])
    return paths


def measure_policy(policy_dir, reference_dir, reward_model_dirs, prompts: list[str], *, samples: int = 4,
                   max_new_tokens: int = MAX_LEN + 1, seed: int = 0) -> dict:
    """Sample `samples` completions per prompt at temperature 1 from the policy; return the mean true score,
    the mean reward-model score (averaged over the folders `reward_model_dirs`: an ensemble, as PPO sees it)
    and the KL to the reference (the SFT policy) per completion, estimated as the mean over samples of
    sum_t log pi(y_t) - log pi_ref(y_t) (k1, unbiased)."""
    import torch

    from pipeline.rollout.generation import neutral_generation_config, sample_completions
    from pipeline.models import completion_forward, load_causal_lm, load_tokenizer
    from pipeline.rewards.models import RewardModelFunction

    policy, tokenizer = load_causal_lm(policy_dir), load_tokenizer(policy_dir)
    policy.generation_config = neutral_generation_config(policy, tokenizer)
    reference = load_causal_lm(reference_dir)
    repeated = [p for p in prompts for _ in range(samples)]
    with torch.no_grad():
        out = sample_completions(policy, tokenizer, repeated, max_new_tokens, do_sample=True, temperature=1.0,
                                 generator_seed=seed)
        batch = {k: out[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
        mask = batch["completion_mask"].float()
        logp = completion_forward(policy, **batch)["logprobs"]
        ref = completion_forward(reference, **batch)["logprobs"]
    completions = out["completions"]
    rm = [s for d in reward_model_dirs for s in RewardModelFunction(str(d))(repeated, completions)]
    return {"true_score": sum(true_score(repeated, completions)) / len(repeated),
            "reward_model_score": sum(rm) / len(rm),         # every model scores every completion: the mean
            "kl_to_sft": float(((logp - ref) * mask).sum(-1).mean()),
            "mean_length": float(mask.sum(-1).mean()),
            "examples": [(p, c) for p, c in zip(repeated[:8:samples], completions[:8:samples])]}


def ensemble_accuracy(reward_model_dirs, pairs_path) -> float:
    """Held-out pairwise accuracy of the mean of the reward models' scores (the reward PPO is given) on the
    pairs file `pairs_path` (prompt, chosen, rejected): one model's is its training run's eval/accuracy."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.algorithms.preference import pairwise_accuracy
    from pipeline.rewards.models import RewardModelFunction

    pairs = pq.read_table(pairs_path, columns=["prompt", "chosen", "rejected"]).to_pydict()
    chosen, rejected = torch.zeros(len(pairs["prompt"])), torch.zeros(len(pairs["prompt"]))
    for d in reward_model_dirs:
        score = RewardModelFunction(str(d))
        chosen += torch.tensor(score(pairs["prompt"], pairs["chosen"]))
        rejected += torch.tensor(score(pairs["prompt"], pairs["rejected"]))
    return pairwise_accuracy(chosen, rejected)


__all__ = ["LETTERS", "MAX_LEN", "true_score", "make_preference_task", "measure_policy", "ensemble_accuracy"]
