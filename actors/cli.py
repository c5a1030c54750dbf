"""The `rlpipe` command. Heavy libraries are imported inside each subcommand to keep `--help` instant.

Commands of packages on top of this one (`tune`, from `tuning`) join through the `rlpipe.commands`
entry-point group (pyproject.toml): a function that adds its subparser. So the layers stay one-way:
`tuning` uses `actors`, never the reverse.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

COMMAND_GROUP = "rlpipe.commands"


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file or preset name (grpo, ppo, ...); default: the "
                   "resumed run's saved config, else built-in defaults")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in train.output_dir")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray on this machine)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="config overrides, e.g. algorithm.clip_range=0.1 learner.lr=1e-4")


def cmd_train(args) -> int:
    from actors.run import resume_config_path, run_training
    from pipeline.config import load_config

    config = args.config
    overrides = list(args.overrides)
    if args.resume:
        saved = resume_config_path(args.resume)      # refuses a folder another command made
        config = config or saved
        overrides.append(f"train.output_dir={args.resume}")
    cfg = load_config(config, overrides)
    summary = run_training(cfg, resume=bool(args.resume), overwrite=args.overwrite, address=args.address)
    print(f"run directory: {summary['run_dir']}  (MLflow run {summary['mlflow_run_id']})")
    return 0


def cmd_warmstart(args) -> int:
    from pipeline.demo.warmstart import DEMO_SEED, run_warmstart

    run_warmstart(args.out, seed=DEMO_SEED if args.seed is None else args.seed)
    return 0


def _flag_fields(cls, prefix: str = ""):
    """(flag name, dotted key, field) of every field of a run-settings dataclass; a nested section's fields are
    `--section-field` (e.g. --lora-rank)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _flag_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"--{(prefix + f.name).replace('.', '-').replace('_', '-')}", prefix + f.name, f, hints[f.name]


def add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    """One --flag per field of a run-settings dataclass, its help the field's doc (documented once)."""
    import dataclasses

    for flag, key, f, _ in _flag_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        shown = "" if default in (None, "") else f" (default {default})"
        choices = f" One of: {', '.join(f.metadata['choices'])}." if f.metadata.get("choices") else ""
        metavar = "VALUE" if f.type not in ("bool", bool) else "true|false"
        p.add_argument(flag, dest=key, default=None, metavar=metavar,
                       help=(f.metadata["doc"] + choices + shown).replace("%", "%%"))


def config_from_args(cls, args, settings_name: str):
    """The run settings: the resumed run's saved ones (if --resume), then every flag given on the command line."""
    import dataclasses
    import typing

    from pipeline.config import _parse_scalar, set_dotted
    from pipeline.runs.supervised import build_run_config, read_run_settings

    values = dataclasses.asdict(read_run_settings(cls, args.resume, settings_name)) if args.resume else {}
    for _, key, f, hint in _flag_fields(cls):
        raw = getattr(args, key)
        if raw is not None:
            text_field = hint in (str, typing.Optional[str])
            set_dotted(values, key, raw if text_field and raw != "null" else _parse_scalar(raw))
    if args.resume:
        values["out"] = args.resume
    return build_run_config(cls, values)


def cmd_sft(args) -> int:
    from actors.supervised import launch_learners
    from pipeline.runs.supervised import SFTConfig, run_sft

    run_sft(config_from_args(SFTConfig, args, "sft.yaml"), resume=bool(args.resume), overwrite=args.overwrite,
            launch=launch_learners)
    return 0


def cmd_reward_model(args) -> int:
    from actors.supervised import launch_learners
    from pipeline.runs.supervised import RewardModelConfig, run_reward_model

    run_reward_model(config_from_args(RewardModelConfig, args, "reward_model.yaml"), resume=bool(args.resume),
                     overwrite=args.overwrite, launch=launch_learners)
    return 0


def cmd_init_model(args) -> int:
    from pipeline.runs.init_model import init_model

    info = init_model(args.data, args.out, tokenizer=args.tokenizer, size=args.size, vocab_size=args.vocab_size,
                      max_positions=args.max_positions, seed=args.seed)
    print(f"{info['path']}: {info['parameters'] / 1e6:.2f} M-parameter Llama, {info['tokenizer']} tokenizer of "
          f"{info['vocab_size']} entries, context {info['max_positions']} (longest data row: "
          f"{info['longest_row_tokens']} tokens)")
    return 0


def cmd_eval(args) -> int:
    from pipeline.data.prompt_table import read_prompt_table
    from pipeline.rollout.evaluation import exact_match_accuracy
    from pipeline.models import load_causal_lm, load_tokenizer

    table = read_prompt_table(args.data, ("prompt", "answer")).slice(0, args.n)
    model, tok = load_causal_lm(args.model), load_tokenizer(args.model)
    acc = exact_match_accuracy(model, tok, table.column("prompt").to_pylist(),
                               [str(a) for a in table.column("answer").to_pylist()], args.max_new_tokens)
    print(f"{args.model}: exact match {acc:.1%} on {table.num_rows} prompts of {args.data}")
    return 0


def cmd_demo(args) -> int:
    from actors.demo import (PREFERENCE_PPO_STEPS, RL_STEPS, SFT_STEPS, TOOLS_RL_STEPS, TOOLS_SEED, TOOLS_SFT_STEPS,
                             given_or_default, run_demo, run_preference_demo, run_tools_demo)

    if args.task == "tools":
        rl_minutes, rl_steps = given_or_default(args.rl_minutes, args.rl_steps, TOOLS_RL_STEPS)
        run_tools_demo(args.out or "runs/tools", seed=TOOLS_SEED if args.seed is None else args.seed,
                       rl_minutes=rl_minutes, rl_steps=rl_steps, sft_steps=args.sft_steps or TOOLS_SFT_STEPS)
    elif args.task == "preference":
        ppo_minutes, ppo_steps = given_or_default(args.rl_minutes, args.rl_steps, PREFERENCE_PPO_STEPS)
        run_preference_demo(args.out or "runs/preference", ppo_minutes=ppo_minutes, ppo_steps=ppo_steps,
                            seed=args.seed or 0)
    else:
        rl_minutes, rl_steps = given_or_default(args.rl_minutes, args.rl_steps, RL_STEPS)
        sft_minutes, sft_steps = given_or_default(args.sft_minutes, args.sft_steps, SFT_STEPS)
        run_demo(args.out or "runs/demo", algos=args.algos.split(","), rl_minutes=rl_minutes, rl_steps=rl_steps,
                 sft_minutes=sft_minutes, sft_steps=sft_steps, seed=args.seed)
    return 0


def cmd_config(args) -> int:
    from pipeline.config import config_reference_markdown, load_config

    if args.doc:
        print(config_reference_markdown())
    else:
        print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def _run_configs() -> dict:
    from pipeline.runs.supervised import RewardModelConfig, SFTConfig

    return {"sft": SFTConfig, "reward-model": RewardModelConfig}


def _plugin_commands() -> dict[str, Callable]:
    """{command name: its `register(subparsers)` function} of installed packages that add rlpipe commands
    (loaded only when the command is not known yet)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.load for ep in entry_points(group=COMMAND_GROUP)}


def build_parser(extra_commands: Optional[dict[str, Callable]] = None) -> argparse.ArgumentParser:
    """The parser with the built-in commands, then `extra_commands` ({name: register function that adds the
    subparser}), then those of installed plugins; a name already taken stays with its first owner."""
    parser = argparse.ArgumentParser(prog="rlpipe", description="Ray-based RL for language models: rollout "
                                     "generators, reward scorers and learners as Ray actors.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a policy with RL (GRPO, PPO, ...)")
    _add_train_args(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("warmstart", help="build the demo task, a small model, and fine-tune it supervised")
    p.add_argument("--out", default="runs/demo", help="folder for data/, init/, warm/ (default runs/demo)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of data, init and training (default: the demo's measured seed)")
    p.set_defaults(fn=cmd_warmstart)
    p = sub.add_parser("init-model", help="a new small model whose tokenizer covers your data (offline)")
    p.add_argument("--data", required=True, nargs="+", help="Parquet / JSON-lines files whose text the tokenizer "
                   "must cover (every text column, chat messages included)")
    p.add_argument("--out", required=True, help="folder for the Hugging Face model")
    p.add_argument("--tokenizer", default="char", choices=("char", "bpe"),
                   help="char: one token per character found; bpe: byte-level BPE fitted to the data (default char)")
    p.add_argument("--size", default="tiny", choices=("tiny", "small", "base"),
                   help="tiny ~0.8 M parameters (the demo's), small ~5 M, base ~25 M (default tiny)")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (default 1024)")
    p.add_argument("--max-positions", type=int, default=None,
                   help="context length (default: twice the longest data row, rounded up to 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default 0)")
    p.set_defaults(fn=cmd_init_model)
    for name, text, fn in (("sft", "supervised fine-tuning of a causal LM on your demonstrations", cmd_sft),
                           ("reward-model", "train a reward model on preference pairs (Bradley-Terry)",
                            cmd_reward_model)):
        p = sub.add_parser(name, help=text)
        add_config_flags(p, _run_configs()[name])
        p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
        p.set_defaults(fn=fn)
    p = sub.add_parser("eval", help="greedy exact-match accuracy of a model folder on a prompt/answer file")
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--data", required=True, help="Parquet or JSONL file with prompt and answer columns")
    p.add_argument("--n", type=int, default=500, help="rows to evaluate (default 500)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="completion cap (default 8)")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("demo", help="the local demos: arithmetic (warm start, GRPO and PPO, supervised baseline), "
                       "preference (SFT, reward model, PPO against it) or tools (an agent with a lookup tool)")
    p.add_argument("--task", default="arithmetic", choices=("arithmetic", "preference", "tools"),
                   help="arithmetic: RL from a verifier vs more supervised training; preference: DeepSpeed-Chat's "
                   "three steps against a hidden judge; tools: multi-turn tool use, RL through the environment vs "
                   "more supervised training on the demonstrated episodes (default arithmetic)")
    p.add_argument("--out", default=None, help="demo folder (default runs/demo, runs/preference, runs/tools)")
    p.add_argument("--algos", default="grpo,ppo", help="comma-separated presets to train (default grpo,ppo)")
    p.add_argument("--rl-minutes", type=float, default=None,
                   help="RL time budget per algorithm instead of the default steps")
    p.add_argument("--rl-steps", type=int, default=None,
                   help="RL steps per algorithm (default 500; the preference demo's PPO 150, the tools demo's GRPO "
                   "200): the same run on any "
                   "machine, where minutes buy ~2.5x more or fewer steps by machine (with --rl-minutes too, "
                   "whichever ends first)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of data, models and training (default: arithmetic 1, the measured one; preference and "
                   "tools 0)")
    p.add_argument("--sft-minutes", type=float, default=None,
                   help="the baseline's continued supervised training in minutes, instead of the default steps; 0 "
                   "skips it")
    p.add_argument("--sft-steps", type=int, default=None,
                   help="the baseline's budget in supervised steps (default 2000; the tools demo's 1000)")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("config", help="print the resolved config, or the field reference with --doc")
    p.add_argument("--config", "-c", help="YAML file or preset name")
    p.add_argument("--doc", action="store_true", help="print every field with its default and meaning")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    p.set_defaults(fn=cmd_config)
    for name, register in (extra_commands or {}).items():
        if name not in sub.choices:
            register(sub)
    for name, load in _plugin_commands().items():
        if name not in sub.choices:
            load()(sub)
    return parser


def main(argv: list[str] | None = None, extra_commands: Optional[dict[str, Callable]] = None) -> int:
    import os

    args = build_parser(extra_commands).parse_args(argv)
    # transformers' per-load and per-save progress bars ("Loading weights", "Writing model shards") say
    # nothing a user can act on; the commands print their own progress.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted; finished steps are checkpointed and logged (resume with --resume)", file=sys.stderr)
        return 130
    except Exception as err:
        from pipeline.errors import UserInputError

        if isinstance(err, UserInputError):
            print(f"rlpipe {args.command}: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
