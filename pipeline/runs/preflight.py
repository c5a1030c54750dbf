"""Checks run before a run directory exists or any actor starts, so that bad input writes no half-made run.

Each failure is one `UserInputError` subclass naming the thing (field, file, row, column, module) and the
fix: `ModelLoadError` (model or critic path), `LoraTargetError` (a lora.target_modules name the model lacks),
`DataError` (prompt files; every prompt empty), `RewardLoadError` (reward functions), `EnvironmentLoadError` (env.name), `PromptError` (a prompt
the tokenizer cannot render, or one that does not fit the model), `VLLMMissing` (rollout.backend=vllm without
vLLM). Settings that run but not as the user may think are one printed warning line.
"""
from __future__ import annotations

import inspect

from pipeline.config import RunConfig


def required_columns(reward_fns: list) -> set[str]:
    """Dataset columns the reward functions take as required keyword parameters (e.g. `answer`)."""
    needed = set()
    for fn in reward_fns:
        for i, (name, p) in enumerate(inspect.signature(fn).parameters.items()):
            if i < 2 or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is not p.empty:
                continue
            needed.add(name)
    return needed


def check_prompt_lengths(cfg: RunConfig, train, evaluation, log=print):
    """Tokenise every prompt as generation will (chat template included) and refuse one that, with the
    completion budget, runs past the model's positions: a rotary model would run silently beyond its
    trained range, a learned-position model would crash mid-run. With `data.max_prompt_tokens`, longer
    training prompts are dropped first. -> (train, evaluation) tables, filtered."""
    from pipeline.models import load_model_config, load_tokenizer
    from pipeline.data.prompt_format import PromptError, PromptFormat, max_positions

    d, r = cfg.data, cfg.rollout
    prompt_format = PromptFormat(load_tokenizer(cfg.model.path), d.chat_template)
    positions = max_positions(load_model_config(cfg.model.path))
    train_lengths = prompt_format.lengths(train.column(d.prompt_column).to_pylist())
    if d.max_prompt_tokens is not None:
        keep = [i for i, n in enumerate(train_lengths) if n <= d.max_prompt_tokens]
        if not keep:
            raise PromptError(f"data.max_prompt_tokens={d.max_prompt_tokens} drops every prompt of {d.train_path} "
                              f"(shortest: {min(train_lengths)} tokens); raise it")
        if len(keep) < len(train_lengths):
            log(f"data.max_prompt_tokens={d.max_prompt_tokens}: dropped {len(train_lengths) - len(keep)} of "
                f"{len(train_lengths)} training prompts")
            train = train.take(keep)
            train_lengths = [train_lengths[i] for i in keep]
    budget = (cfg.env.max_episode_tokens, "env.max_episode_tokens") if cfg.env.name else \
        (r.max_new_tokens, "rollout.max_new_tokens")     # an episode's turns and observations follow its prompt
    checks = [("data.train_path", d.train_path, train_lengths, *budget)]
    if evaluation is not None:
        eval_lengths = prompt_format.lengths(evaluation.column(d.prompt_column).to_pylist())
        checks.append(("data.eval_path", d.eval_path, eval_lengths, r.eval_max_new_tokens or r.max_new_tokens,
                       "rollout.eval_max_new_tokens" if r.eval_max_new_tokens else "rollout.max_new_tokens"))
    for field, path, lengths, new_tokens, budget_field in checks:
        if positions is None or not lengths:
            continue
        row = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[row] + new_tokens > positions:
            drop = (f", or set data.max_prompt_tokens={max(1, positions - new_tokens)} to drop longer training "
                    "prompts") if field == "data.train_path" else ""
            raise PromptError(
                f"{field} {path}: row {row} has a prompt of {lengths[row]} tokens; with {budget_field}="
                f"{new_tokens} that is {lengths[row] + new_tokens} positions, but the model has {positions}. "
                f"Shorten the prompts or lower {budget_field}{drop}")
    return train, evaluation


def preflight(cfg: RunConfig, log=print, *, local_actors: bool = True):
    """Validate model, data, prompts, reward functions and the generation backend. Returns (train table, eval
    table or None, composer); the tables are what the run trains and evaluates on (after dropping empty
    prompts and any `data.max_prompt_tokens`). local_actors: the actors run on this machine (a local Ray),
    so what this Python imports is what theirs will (vLLM); on a cluster their nodes' packages may differ."""
    from pipeline.data.prompt_table import DataError, drop_empty_prompts, read_prompt_table, require_columns
    from pipeline.models import load_model_config
    from pipeline.rewards.functions import RewardComposer
    from pipeline.rollout import check_backend

    check_backend(cfg.rollout.backend)
    if cfg.learner.parallel == "shard" and cfg.resources.learners == 1:
        # Not refused: a sharded run's checkpoint legitimately resumes on one learner.
        log("warning: learner.parallel=shard with resources.learners=1 does not shard: sharding starts at 2 "
            "learners, and one learner holds the whole model (set resources.learners=2 or more to shard)")
    model_config = load_model_config(cfg.model.path, "model.path")
    if cfg.lora.rank:
        from pipeline.trainers.lora import check_target_modules

        check_target_modules(model_config, cfg.lora.target_modules, f"model.path {cfg.model.path}")
    if cfg.model.critic_path:
        load_model_config(cfg.model.critic_path, "model.critic_path")
    composer = RewardComposer(cfg.reward.functions, cfg.reward.weights, cfg.reward.failed_reward)
    if cfg.reward.models:
        from pipeline.rewards.models import check_reward_model

        for i, m in enumerate(cfg.reward.models):      # the scorers load them; here only their configs
            check_reward_model(m["path"], f"reward.models[{i}].path")
    columns = required_columns(composer.fns)
    if cfg.env.name:                  # the environment scores its episodes; the reward functions are not called
        from pipeline.envs import resolve_environment

        resolve_environment(cfg.env.name)
        columns = set()
    d = cfg.data
    train = read_prompt_table(d.train_path, (d.prompt_column, *sorted(columns)))
    train = drop_empty_prompts(train, d.prompt_column, "data.train_path", d.train_path, log)
    evaluation = None
    if d.eval_path:
        evaluation = read_prompt_table(d.eval_path, (d.prompt_column,))
        if not cfg.env.name and "answer" not in evaluation.column_names:     # single-turn, evaluated by reward
            if not cfg.reward.functions and not cfg.reward.models:
                raise DataError(f"data.eval_path {d.eval_path} has no `answer` column, so it is evaluated by the "
                                "reward, and reward.functions and reward.models are empty: add an answer column for "
                                "exact match, or a reward")
            require_columns(evaluation, d.eval_path, sorted(columns))
        evaluation = drop_empty_prompts(evaluation, d.prompt_column, "data.eval_path", d.eval_path, log)
        evaluation = evaluation.slice(0, d.eval_size)
    train, evaluation = check_prompt_lengths(cfg, train, evaluation, log)
    if cfg.rollout.backend == "vllm" and local_actors:
        from pipeline.rollout.vllm_backend import import_vllm

        import_vllm()       # last: importing vLLM takes seconds; VLLMMissing names the extra to install
    return train, evaluation, composer
