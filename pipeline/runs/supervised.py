"""The supervised commands as runs over the shared `train_loop`: `rlpipe sft` (fine-tune a causal LM on
demonstrations) and `rlpipe reward-model` (Bradley-Terry on preference pairs), with a run folder like RL's:

    <out>/sft.yaml          the resolved settings (what `--resume` reads back; reward_model.yaml)
    <out>/checkpoints/      step_*/ (weights, optimizer, data order, RNG; safetensors)
    <out>/best/             the best weights so far (Hugging Face folder, replaced atomically)
    <out>/model/            the result: a Hugging Face folder for `rlpipe train model.path=...`
    <out>/results.json      held-out metrics of the result, the curve
    <out>/mlflow.db         the MLflow run (params, metrics per evaluation), `mlartifacts/`

Settings are fields documented once (`F` metadata); the CLI makes its flags from them. All input is read and
checked (columns, message format, chat template, lengths) before the run folder is created.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from pipeline.config import ConfigError, EngineSettings, F, LoraConfig, _build, check_engine_layout
from pipeline.data.prompt_table import DataError


@dataclass
class SupervisedRunConfig(EngineSettings):
    """What every supervised run shares: model, data, schedule, stopping, precision, output; the engine's
    settings (weight decay, warm-up, clipping, micro-batches, checkpointing, replicated or sharded learners) and
    LoRA (`--lora-rank`, ...) are RL's, documented once in `pipeline.config.EngineSettings` and `LoraConfig`."""
    model: str = F("", "Model to start from: a Hugging Face folder (e.g. made by `rlpipe init-model`) or hub name.")
    data: str = F("", "Training data: Parquet or JSON lines.")
    out: str = F("runs/sft", "Run folder (settings, checkpoints, MLflow, the trained model in <out>/model).")
    eval_data: Optional[str] = F(None, "Held-out data with the same columns; default: --eval-size rows drawn from "
                                 "--data (and left out of training).")
    eval_size: Optional[int] = F(None, "Rows held out of --data for evaluation when there is no --eval-data; "
                                 "default: 10% of the rows, at most 200, at least 1.", lo=1)
    lr: float = F(1e-4, "Peak learning rate (AdamW). Pretrained models want ~1e-5; a small model made by "
                  "init-model, trained from scratch, ~3e-3.", lo=0.0)
    batch_size: int = F(32, "Rows per optimizer step.", lo=1)
    max_steps: Optional[int] = F(2000, "Stop after this many steps (null: no step limit).", lo=1)
    minutes: Optional[float] = F(None, "Stop after this many minutes (evaluation time counts).", lo=0.0)
    patience: Optional[int] = F(5, "Early stopping: stop after this many evaluations without a better held-out "
                                "score and keep the best weights (null: train to the limit, keep the last).", lo=1)
    eval_every: int = F(100, "Steps between held-out evaluations.", lo=1)
    cosine: bool = F(True, "Decay the lr (cosine) to 10% of its peak at --max-steps; off: constant after warm-up.")
    dtype: str = F("float32", "Compute dtype (float32 master weights, autocast to it).",
                   choices=("float32", "bfloat16", "float16"))
    device: str = F("cpu", "Device of the model.", choices=("cpu", "cuda"))
    checkpoint_every: int = F(500, "Steps between checkpoints (a checkpoint is also written at the end).", lo=1)
    seed: int = F(0, "Seed of the held-out split and the data order.")
    learners: int = F(1, "Data-parallel learners: Ray actors that each take a share of every minibatch, with "
                      "gradients summed over them (K learners take the step one would take). Above 1, a local Ray "
                      "starts unless $RAY_ADDRESS names a cluster.", lo=1)
    cpus_per_learner: float = F(1.0, "CPU share of each learner when --learners > 1 (torch threads: the share "
                                "rounded, at least 1); with --device cuda each learner also takes one GPU.", lo=0.0)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SFTConfig(SupervisedRunConfig):
    """`rlpipe sft`: demonstrations as prompt/response columns or a messages column (`pipeline.data.demonstrations`)."""
    prompt_column: str = F("prompt", "Prompt column: text, or a list of {role, content} messages.")
    response_column: Optional[str] = F(None, "Response column (loss is on its tokens + EOS); default: `response` "
                                       "if present, else the answer column.")
    messages_column: Optional[str] = F(None, "A column of conversations ending with the assistant's reply: the "
                                       "reply is the response, the messages before it the prompt (chat template).")
    answer_column: str = F("answer", "Column held-out greedy exact match compares with, when the data has it; "
                           "early stopping then follows exact match, else the held-out loss.")
    chat_template: bool = F(False, "Render text prompts as one user message with the tokenizer's chat template.")
    max_new_tokens: Optional[int] = F(None, "Completion cap of the exact-match evaluation (default: longest "
                                      "held-out answer + 1).", lo=1)


@dataclass
class RewardModelConfig(SupervisedRunConfig):
    """`rlpipe reward-model`: Bradley-Terry on preference pairs (`pipeline.data.preference_pairs`)."""
    out: str = F("runs/reward_model", "Run folder (settings, checkpoints, MLflow, the reward model in <out>/model).")
    model: str = F("", "Backbone: a causal LM folder (e.g. the SFT model, as DeepSpeed-Chat does) or an encoder "
                   "(BERT, MiniLM, ...); a new one-label score head goes on top.")
    lr: float = F(5e-5, "Peak learning rate (AdamW).", lo=0.0)
    max_steps: Optional[int] = F(1000, "Stop after this many steps (null: no step limit).", lo=1)
    prompt_column: str = F("prompt", "Prompt column: text, or a list of {role, content} messages.")
    chosen_column: str = F("chosen", "The preferred response.")
    rejected_column: str = F("rejected", "The other response (must differ from chosen).")
    margin_column: str = F("margin", "Optional per-pair margin (loss -log sigmoid(r_c - r_r - margin)); used when "
                           "the data has this column.")
    max_length: Optional[int] = F(None, "Tokens per scored sequence (longer: cut); default: the model's "
                                  "positions.", lo=8)


def build_run_config(cls, values: dict):
    """`cls` from {field: value}: the run config's own builder (unknown keys refused, each value checked
    against its field), then the settings every supervised run needs."""
    cfg = _build(cls, values, "")
    for name in ("model", "data"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name} is required")
    check_engine_layout(cfg, cfg.lora, cfg.learners, cfg.dtype, {"parallel": "--parallel", "cpu_offload":
                        "--cpu-offload", "learners": "--learners", "dtype": "--dtype", "lora": "--lora-"})
    return cfg


def lora_options(cfg: SupervisedRunConfig) -> Optional[dict]:
    """The run's LoRA as `TrainEngine` takes it; None for full fine-tuning."""
    return dataclasses.asdict(cfg.lora) if cfg.lora.rank else None


# ----------------------------------------------------------------------------- the run folder

def open_run_folder(cfg, settings_name: str, *, resume: bool, overwrite: bool):
    """Claim (or, resuming, reopen) cfg.out (`pipeline.runs.folder`), then write its settings file and open its
    MLflow run. -> (folder, tracker)."""
    from pipeline.runs.folder import claim_run_folder
    from pipeline.tracking import Tracker, flatten_config

    out = claim_run_folder(cfg.out, settings_name, resume=resume, overwrite=overwrite, where="--out")
    state = out / "run.json"
    if resume:
        run_id = json.loads(state.read_text())["mlflow_run_id"]
        tracker = Tracker(out, resume_run_id=run_id)
    else:
        (out / settings_name).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        tracker = Tracker(out, run_name=out.name, tags={"rlpipe.kind": settings_name.split(".")[0]})
        tracker.log_params(flatten_config(dataclasses.asdict(cfg)))
        state.write_text(json.dumps({"mlflow_run_id": tracker.run_id}))
    return out, tracker


def read_run_settings(cls, run_dir, settings_name: str):
    """The config a run folder was started with (for `--resume`); a folder of another command, or of none, is
    refused by `claim_run_folder`'s rules."""
    from pipeline.runs.folder import claim_run_folder

    claim_run_folder(run_dir, settings_name, resume=True, overwrite=False, where="--out folder")
    return build_run_config(cls, yaml.safe_load((Path(run_dir) / settings_name).read_text()))


# ----------------------------------------------------------------------------- sft

def _demonstrations(cfg: SFTConfig):
    from pipeline.data.demonstrations import read_demonstrations

    columns = dict(prompt_column=cfg.prompt_column, response_column=cfg.response_column,
                   messages_column=cfg.messages_column, answer_column=cfg.answer_column)
    data = read_demonstrations(cfg.data, **columns)
    if cfg.eval_data:
        return data, read_demonstrations(cfg.eval_data, **columns)
    return data.split(cfg.eval_size, cfg.seed)


def check_lora_targets(cfg: SupervisedRunConfig, model_config, auto_class: str) -> None:
    """With --lora-rank > 0, every --lora-target-modules name must be a module of the model (before any learner
    loads it)."""
    if cfg.lora.rank:
        from pipeline.trainers.lora import check_target_modules

        check_target_modules(model_config, cfg.lora.target_modules, f"--model {cfg.model}", auto_class)


def check_lengths(tokenizer, prompt_format, demos, model_config, what: str) -> None:
    """Every prompt + response + EOS must fit the model's positions: else one error naming the row."""
    from pipeline.data.prompt_format import max_positions

    limit = max_positions(model_config)
    if limit is None:
        return
    prompt_lengths = prompt_format.lengths(demos.prompts)
    from pipeline.trainers.sft import episode_ids

    rendered = prompt_format.render(demos.prompts)[1]
    response_lengths = [len(episode_ids(prompt_format, r, chat)[0]) - 1 if isinstance(r, list)   # the EOS below
                        else len(tokenizer(r, add_special_tokens=False)["input_ids"])
                        for r, chat in zip(demos.responses, rendered)]
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        if p + r + 1 > limit:
            raise DataError(f"{what}: row {i} has {p} prompt + {r} response tokens + EOS, more than the model's "
                            f"{limit} positions; drop or shorten such rows, or use a model with a longer context")


def run_sft(cfg: SFTConfig, *, resume: bool = False, overwrite: bool = False,
            log: Callable[[str], None] = print, launch: Optional[Callable] = None) -> dict:
    """Fine-tune cfg.model on cfg.data (see the module docstring); returns the results dict (also written).
    launch: how cfg.learners > 1 learners start (`actors.supervised.launch_learners`; the CLI passes it)."""
    import functools

    from pipeline.models import load_model_config, load_tokenizer
    from pipeline.data.prompt_format import PromptFormat

    train, held_out = _demonstrations(cfg)
    tokenizer = load_tokenizer(cfg.model)
    prompt_format = PromptFormat(tokenizer, chat_template=cfg.chat_template)
    model_config = load_model_config(cfg.model, "causal LM")
    check_lengths(tokenizer, prompt_format, train, model_config, cfg.data)
    check_lengths(tokenizer, prompt_format, held_out, model_config, cfg.eval_data or f"{cfg.data} (held out)")
    check_lora_targets(cfg, model_config, "AutoModelForCausalLM")
    return train_in_run_folder(cfg, functools.partial(build_sft_trainer, cfg, train, held_out), "sft.yaml",
                               f"sft: {len(train)} training rows, {len(held_out)} held out",
                               resume=resume, overwrite=overwrite, log=log, launch=launch)


def build_sft_trainer(cfg: SFTConfig, train, held_out, rank: int = 0, world_size: int = 1, group=lambda: None):
    """The `SupervisedTrainer` of an sft run (on every data-parallel rank alike: same seed, same model)."""
    import torch

    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.data.prompt_format import PromptFormat
    from pipeline.trainers.sft import SupervisedTrainer

    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    return SupervisedTrainer(
        load_causal_lm(cfg.model, device=cfg.device), tokenizer, train.prompts, train.responses, held_out.prompts,
        held_out.responses, held_out.answers, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
        warmup_steps=cfg.warmup_steps, decay_steps=cfg.max_steps if cfg.cosine else None,
        max_new_tokens=cfg.max_new_tokens, **cfg.engine_options(cfg.dtype), lora=lora_options(cfg),
        prompt_format=PromptFormat(tokenizer, chat_template=cfg.chat_template),
        rank=rank, world_size=world_size, group=group)


def run_reward_model(cfg: RewardModelConfig, *, resume: bool = False, overwrite: bool = False,
                     log: Callable[[str], None] = print, launch: Optional[Callable] = None) -> dict:
    """Train a reward model on cfg.data's pairs (see the module docstring); returns the results dict.
    launch: as for `run_sft`."""
    import functools

    from pipeline.models import load_model_config, load_tokenizer
    from pipeline.data.preference_pairs import read_preference_pairs
    from pipeline.rewards.models import backbone_layout

    columns = dict(prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
                   rejected_column=cfg.rejected_column, margin_column=cfg.margin_column)
    pairs = read_preference_pairs(cfg.data, **columns)
    train, held_out = (pairs, read_preference_pairs(cfg.eval_data, **columns)) if cfg.eval_data \
        else pairs.split(cfg.eval_size, cfg.seed)
    load_tokenizer(cfg.model)
    model_config = load_model_config(cfg.model, "reward model backbone")
    layout = backbone_layout(model_config)
    check_lora_targets(cfg, model_config, "AutoModelForSequenceClassification")
    return train_in_run_folder(cfg, functools.partial(build_reward_model_trainer, cfg, train, held_out),
                               "reward_model.yaml", f"reward model: {len(train)} training pairs, {len(held_out)} "
                               f"held out; {layout} layout", resume=resume, overwrite=overwrite,
                               log=log, launch=launch)


def build_reward_model_trainer(cfg: RewardModelConfig, train, held_out, rank: int = 0, world_size: int = 1,
                               group=lambda: None):
    """The `RewardModelTrainer` of a reward-model run (a new score head, seeded alike on every rank)."""
    import torch

    from pipeline.models import load_tokenizer
    from pipeline.data.prompt_format import max_positions
    from pipeline.rewards.models import build_reward_model
    from pipeline.trainers.reward_model import RewardModelTrainer

    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = build_reward_model(cfg.model, tokenizer).to(cfg.device)
    return RewardModelTrainer(
        model, tokenizer, train, held_out, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
        warmup_steps=cfg.warmup_steps, decay_steps=cfg.max_steps if cfg.cosine else None,
        **cfg.engine_options(cfg.dtype), lora=lora_options(cfg),
        max_length=cfg.max_length or max_positions(model.config), rank=rank, world_size=world_size, group=group)


def train_in_run_folder(cfg: SupervisedRunConfig, build: Callable, settings_name: str, what: str, *, resume: bool,
                        overwrite: bool, log: Callable[[str], None], launch: Optional[Callable] = None) -> dict:
    """Build the trainer (`build()`, or cfg.learners data-parallel ones through `launch(build, cfg)`), then open
    the run folder (all input is checked by now), run `train_loop` with cfg's schedule, finish the run."""
    from pipeline.trainers.loop import train_loop

    if cfg.parallel == "shard" and cfg.learners == 1:
        log("warning: --parallel shard with --learners 1 does not shard: sharding starts at 2 learners")
    if cfg.learners > 1 and launch is None:
        raise ConfigError(f"learners={cfg.learners} needs Ray actors: run it with the rlpipe command, or pass "
                          "launch=actors.supervised.launch_learners")
    trainer = build() if cfg.learners == 1 else launch(build, cfg)
    try:
        out, tracker = open_run_folder(cfg, settings_name, resume=resume, overwrite=overwrite)
        learners = f" x {cfg.learners} data-parallel learners ({trainer.layout()})" if cfg.learners > 1 else ""
        log(f"{what}; {trainer.num_parameters() / 1e6:.1f} M parameters{learners}; run folder {out}")
        with tracker:
            result = train_loop(trainer, eval_every=cfg.eval_every, max_steps=cfg.max_steps,
                                time_budget_s=None if cfg.minutes is None else 60 * cfg.minutes,
                                patience=cfg.patience, run_dir=str(out), checkpoint_every=cfg.checkpoint_every,
                                resume=resume, tracker=tracker, log=log)
            return finish_run(trainer, result, out, tracker, log)
    finally:
        trainer.close()


def finish_run(trainer, result: dict, out: Path, tracker, log) -> dict:
    """Write the kept weights to out/model and results.json; log both to MLflow; print where they are."""
    model_dir = trainer.save_model(out / "model")
    kept = result["kept_metrics"]
    summary = {"model_dir": model_dir, "steps": result["steps"], "seconds": result["seconds"],
               "best_step": result["best_step"], "best_metrics": result["best_metrics"],
               "final_metrics": result["final_metrics"], "kept_metrics": kept,
               "skipped_steps": result["skipped_steps"], "curve": result["curve"],
               "mlflow_run_id": tracker.run_id}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    tracker.log_artifact(out / "results.json")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in kept.items() if k.startswith("eval/"))
    log(f"model: {model_dir}  ({shown}; {result['steps']} steps, {result['seconds']:.0f} s)")
    return summary


__all__ = ["SupervisedRunConfig", "SFTConfig", "RewardModelConfig", "build_run_config", "read_run_settings",
           "open_run_folder", "run_sft", "build_sft_trainer", "run_reward_model", "build_reward_model_trainer",
           "train_in_run_folder", "finish_run"]
