"""Typed run configuration: small dataclasses, one per concern, loaded from YAML with dotted overrides.

Every field is documented exactly once, here, in its `doc` metadata; `rlpipe config --doc` renders the
same text as the reference table in docs/configuration.md. Validation is strict: an unknown key, a value of
the wrong type or out of range raises one `ConfigError` naming the dotted field, the bad value and what is
allowed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from pipeline.errors import UserInputError

PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")


class ConfigError(UserInputError):
    """A config value is wrong. The message names the field, the value and what is allowed."""


def F(default: Any, doc: str, *, choices: tuple | None = None, lo: float | None = None,
      hi: float | None = None, factory: Any = None) -> Any:
    """A documented config field. `lo`/`hi` are inclusive bounds for numbers."""
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = F("runs/demo/warm", "Policy to train: a Hugging Face causal-LM folder (save_pretrained) or hub "
                  "name. `rlpipe warmstart` builds the demo's small model here.")
    dtype: str = F("float32", "Compute dtype. Generators and the reference hold their weights in it; learners "
                   "keep float32 master weights (the optimizer steps on those) and run forward and backward under "
                   "autocast to it (mixed precision; float16 adds a loss scaler). float32 = plain fp32 everywhere.",
                   choices=("float32", "bfloat16", "float16"))
    device: str = F("auto", "Where actors run their model: `auto` takes CUDA when the actor was given a GPU, "
                    "else CPU.", choices=("auto", "cpu", "cuda"))
    critic: str = F("separate", "Critic form for estimators that need one (gae): `separate` = a value model "
                    "initialised from `critic_path` (default: the policy) with a linear head; `shared` = a "
                    "value head on the policy's last hidden state, trained with the policy loss.",
                    choices=("separate", "shared"))
    critic_path: Optional[str] = F(None, "Backbone of the separate critic; null = same folder as `path`. A decoder "
                                   "reward model folder (`rlpipe reward-model` on the SFT model) also initialises the "
                                   "value head from its score head, as DeepSpeed-Chat and OpenRLHF start the critic.")
    disable_dropout: bool = F(True, "Set every dropout probability of the model configs to 0 when loading policy, "
                              "critic and reference (RL compares log-probs of two forwards; OpenRLHF and verl do "
                              "the same). The exported model keeps the values it came with.")


@dataclass
class DataConfig:
    train_path: str = F("runs/demo/data/train.parquet", "RL prompt pool: Parquet or JSON lines with a prompt "
                        "column plus any columns the reward functions read (e.g. `answer`).")
    eval_path: Optional[str] = F("runs/demo/data/eval.parquet", "Held-out prompts. With an `answer` column (and "
                                 "no env.name): greedy exact match. Without one, or with env.name: any rows carrying "
                                 "what the reward reads, evaluated by reward (env.eval_samples sampled episodes or "
                                 "completions each: eval/success, eval/pass_at_<k>, eval/mean_reward). null disables "
                                 "evaluation.")
    prompt_column: str = F("prompt", "Name of the prompt column in both files: text, or chat messages (a list of "
                           "{role, content}) that the tokenizer's chat template renders.")
    chat_template: bool = F(False, "Render text prompts as one user message with the tokenizer's chat template "
                            "(generation prompt appended). Rendered prompts are tokenised without special tokens "
                            "(the template writes its BOS); a text that already starts with the BOS gets no second.")
    max_prompt_tokens: Optional[int] = F(None, "Drop training prompts longer than this many tokens before the run "
                                         "(the count is printed); null = keep all, and a prompt that does not fit "
                                         "the model with max_new_tokens is an error before anything starts.", lo=1)
    eval_size: int = F(500, "Eval prompts used (first N rows). A 500-prompt eval moves about +-3.5 points.", lo=1)
    seed: int = F(0, "Seed of the per-epoch prompt shuffle.")


@dataclass
class RolloutConfig:
    prompts_per_step: int = F(64, "B: prompts sampled per training step.", lo=1)
    samples_per_prompt: int = F(8, "G: completions per prompt (the group GRPO/RLOO normalise over).", lo=1)
    max_new_tokens: int = F(8, "Completion length cap in tokens.", lo=1)
    temperature: float = F(1.0, "Sampling temperature; log-probs are computed at this temperature.", lo=1e-3)
    top_p: float = F(1.0, "Nucleus sampling mass. Below 1 the sampler departs from the policy (off-policy).",
                     lo=0.0, hi=1.0)
    top_k: int = F(0, "Top-k sampling; 0 = off.", lo=0)
    backend: str = F("hf", "Generation backend by registered name: `hf` = transformers generate; `vllm` = vLLM's "
                     "engine in each generator (options in the `vllm` section; install the extra, README).")
    eval_max_new_tokens: Optional[int] = F(None, "Greedy eval completion cap; null = max_new_tokens.")
    max_staleness: int = F(0, "Asynchronous rollouts: generators sample up to this many steps ahead of the "
                           "learners, so a trained sample may come from a policy this many versions old. 0 = the "
                           "synchronous loop (generation waits for each update). Above 0, pi_old is the learner's "
                           "own forward at training time and each token is reweighted by pi_old / pi_behaviour "
                           "truncated at algorithm.tis_cap (required).", lo=0)


@dataclass
class VLLMConfig:
    max_model_len: Optional[int] = F(None, "Longest prompt + completion the engine plans its KV cache for; null = "
                                     "the model's position limit.", lo=1)
    kv_cache_gib: int = F(1, "CPU: GiB of KV cache per generator (VLLM_CPU_KVCACHE_SPACE).", lo=1)
    gpu_memory_utilization: float = F(0.5, "GPU: share of the device's memory the engine may take (weights + KV "
                                      "cache); leave room for a learner sharing the GPU.", lo=0.05, hi=0.99)
    enforce_eager: Optional[bool] = F(None, "Run without CUDA graphs / compilation; null = true on CPU (engine start "
                                      "5 s instead of 76 s), false on GPU.")
    enable_prefix_caching: bool = F(True, "Reuse the KV cache of shared prompt prefixes (the G samples of a prompt); "
                                    "the cache is cleared after every weight update.")


@dataclass
class RewardConfig:
    functions: list = F(None, "Reward functions: registered names (`exact_match`, `arithmetic`, "
                        "`format_number`) or `module:function` of your own, each `(prompts, completions, "
                        "**columns) -> list[float | None]`.", factory=lambda: ["exact_match"])
    weights: Optional[list] = F(None, "One weight per function (null = all 1.0); the score is the weighted sum.")
    failed_reward: float = F(0.0, "Score given to a sample whose reward function raised or returned None "
                             "(counted in reward/failed).")
    on_failure: str = F("score", "A sample whose reward failed: `score` trains on it with failed_reward (TRL, "
                        "OpenRLHF); `drop` leaves it out of the loss and of its group's statistics.",
                        choices=("score", "drop"))
    max_failed_steps: int = F(3, "Stop the run with an error when every sample's reward failed this many steps in "
                              "a row (a broken reward function trains on nothing but failed_reward).", lo=1)
    models: list = F(None, "Learned reward models served by every scorer, each a mapping {path, weight (1.0), "
                     "batch_size (64), dtype (float32), name}: `path` a one-label sequence classifier folder (made by "
                     "`rlpipe reward-model`). Their scores join the functions' in the weighted sum, logged per model "
                     "as reward/fn/rm/<name> (default: the folder's name, or its run's for <run>/model). E.g. `reward.models=[{path: runs/reward_model/model}]`.",
                     factory=list)
    normalize: bool = F(False, "Whiten each step's scores with the running mean and std of every score seen so far "
                        "(OpenRLHF's reward normalisation; kept in checkpoints). For learned rewards, whose scale "
                        "is arbitrary.")
    clip: Optional[float] = F(None, "Clip scores (after normalising) to [-clip, clip]: DeepSpeed-Chat's "
                              "clip_reward_value (5 there). null = no clip.", lo=0.0)


@dataclass
class EnvConfig:
    name: Optional[str] = F(None, "Multi-turn environment the generators step each episode through: a registered "
                            "name (`reward_functions`; `pipeline.envs`) or `module:Class` importable from the working "
                            "directory, one instance per episode (docs/environments.md). Its per-turn rewards are "
                            "the episode's score; reward.functions and reward.models are not called. null = "
                            "single-turn: one completion per prompt, scored by the reward section.")
    args: dict = F(None, "Keyword arguments of the environment's constructor.", factory=dict)
    max_turns: int = F(4, "Model turns per episode; an episode still running after them ends with stop_reason "
                       "max_turns.", lo=1)
    max_turn_tokens: Optional[int] = F(None, "Sampled tokens per turn; null = rollout.max_new_tokens. A turn cut "
                                       "by it ends the episode (stop_reason length): no turn runs after truncation.",
                                       lo=1)
    max_episode_tokens: int = F(256, "Tokens after the prompt per episode, sampled turns and observations together; "
                                "the episode ends (stop_reason length) when the next turn would not fit.", lo=1)
    timeout_s: float = F(30.0, "Seconds each environment call (reset, step) may take; past it the episode becomes "
                         "a placeholder (stop_reason timeout) left out of the loss, and the others go on.", lo=0.001)
    truncated_reward: str = F("zero", "What an episode cut by a budget (length, max_turns) is paid: `zero` (SkyRL's "
                              "zero_reward_on_non_stop: unfinished answers earn nothing), or `keep` (the rewards of "
                              "the turns it finished).", choices=("zero", "keep"))
    workers: int = F(16, "Threads per generator running environment calls, so one slow environment never "
                     "blocks the others.", lo=1)
    eval_samples: int = F(1, "k: episodes per held-out row when evaluating (data.eval_path, any columns): logged as "
                          "eval/mean_reward, eval/success (share of episodes scoring at least success_reward) and "
                          "eval/pass_at_<k> (share of rows with a successful episode among k), sampled at "
                          "rollout.temperature.", lo=1)
    success_reward: float = F(1.0, "An episode whose score (the sum of its rewards) reaches this succeeded.")


@dataclass
class AlgorithmConfig:
    name: str = F("grpo", "Advantage estimator, by registry name: gae (PPO with a critic, Schulman 2016), grpo "
                  "(Shao 2024), dr_grpo (Liu 2025), rloo (Ahmadian 2024), reinforce_pp (Hu 2025).")
    clip_range: float = F(0.2, "PPO ratio clip epsilon (Schulman 2017).", lo=0.0, hi=10.0)
    clip_range_high: Optional[float] = F(None, "Upper clip epsilon; null = clip_range. DAPO uses 0.28.",
                                         lo=0.0, hi=10.0)
    dual_clip: Optional[float] = F(None, "Dual-clip bound c > 1 for negative advantages (Ye 2020); null = off.")
    entropy_coef: float = F(0.0, "Entropy bonus weight (subtracted from the loss).", lo=0.0)
    kl_coef: float = F(0.0, "Weight of the KL to the frozen reference; 0 = no reference model is run.", lo=0.0)
    kl_estimator: str = F("k3", "KL estimator (Schulman's approximations). In the reward: k1 (unbiased) or k3. In "
                          "the loss: k2 (its gradient is that of KL(pi||ref)), k3 (gradient of KL(ref||pi), GRPO), or "
                          "k3+ (k3's value, k2's gradient, verl); k1 in the loss has zero expected gradient and is "
                          "refused.", choices=("k1", "k2", "k3", "k3+"))
    kl_in_reward: bool = F(False, "True: subtract kl_coef*KL from the per-token reward (InstructGPT, OpenRLHF); "
                           "False: add kl_coef*KL to the loss (GRPO).")
    old_logprobs: str = F("auto", "pi_old of the importance ratio: `sampler` = the generators' log-probs; `learner` = "
                          "the learner's forward before the update (verl, OpenRLHF), so the first ratio is "
                          "exactly 1 in any dtype: a no-grad pass of its own, or, when the update is one optimizer "
                          "step over the whole batch (learner.epochs 1, minibatch_size >= the batch, no KL in the "
                          "reward), the update's own forward detached, which is the same numbers for one pass "
                          "less (verl's on-policy case); `auto` = learner when model.dtype is not float32 or the generation "
                          "backend is not `hf` (an engine's numerics differ from the learner's), else sampler.",
                          choices=("auto", "sampler", "learner"))
    tis_cap: Optional[float] = F(None, "Truncated importance sampling: with pi_old recomputed by the learner, weight "
                                 "each token's policy loss by min(pi_old / pi_sampler, tis_cap), correcting for an "
                                 "engine that samples from slightly different numbers (Yao 2025; verl uses 2.0); "
                                 "null = off.", lo=1.0)
    gamma: float = F(1.0, "Discount for gae / reinforce_pp.", lo=0.0, hi=1.0)
    lam: float = F(0.95, "GAE lambda.", lo=0.0, hi=1.0)
    scale_by_std: bool = F(True, "GRPO: divide group-centred scores by the group std.")
    value_clip: Optional[float] = F(0.2, "Critic value clip around the rollout-time values; null = off.", lo=0.0)
    value_coef: float = F(0.5, "Weight of the value loss for a `shared` critic.", lo=0.0)
    loss_agg: str = F("token-mean", "How token losses are averaged: token-mean (DAPO/TRL), seq-mean-token-mean "
                      "(GRPO paper), seq-mean-token-sum-norm (Dr.GRPO: token sums / rollout.max_new_tokens).",
                      choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"))


@dataclass
class EngineSettings:
    """How a `TrainEngine` trains, the same for every trainer: RL's learners (`learner.*`) and the supervised
    commands (`rlpipe sft`, `rlpipe reward-model`: the same names as flags). Documented once, here."""
    weight_decay: float = F(0.0, "AdamW weight decay.", lo=0.0)
    warmup_steps: int = F(0, "Linear lr warm-up over this many optimizer updates (RL: training steps).", lo=0)
    max_grad_norm: float = F(1.0, "Gradient clipping by global norm; 0 = off. A non-finite norm skips that "
                             "optimizer step (counted in optim/skipped_steps).", lo=0.0)
    micro_batch_tokens: int = F(0, "Token budget of one forward/backward pass: a learner's share of a minibatch "
                                "is split into micro-batches of at most this many tokens and their gradients "
                                "accumulated, exactly; 0 = one pass. Tokens are rows x padded length, except in "
                                "RL's learner, where compute follows real tokens: rows go longest first, and a "
                                "pass drops the columns none of its rows uses.", lo=0)
    gradient_checkpointing: bool = F(False, "Recompute activations in the backward pass (less memory, ~30% more "
                                     "compute).")
    parallel: str = F("replicate", "How K > 1 data-parallel learners (RL: resources.learners; the supervised "
                      "commands: --learners) hold the model: replicate = each holds all of it and gradients are "
                      "all-reduced; shard = FSDP2 splits weights, gradients and AdamW state K ways (about 1/K each "
                      "per learner), gathering one transformer block at a time. Both take the step one learner "
                      "would. Checkpoints of a sharded run hold the gathered state and resume on any number of "
                      "learners. RL with kl_coef > 0: the learners also hold the frozen reference, sharded the same "
                      "way, instead of a reference actor with a whole copy. LoRA adapters train replicated.",
                      choices=("replicate", "shard"))
    cpu_offload: bool = F(False, "With parallel=shard: the parameter shards, their gradients and AdamW's moments "
                          "stay in host memory and the optimizer steps there (FSDP2's CPUOffloadPolicy); the device "
                          "holds only the block being gathered. For models whose shards do not fit the GPUs; slower "
                          "(weights cross to the device every pass). No memory change on a CPU.")

    def engine_options(self, compute_dtype: str) -> dict:
        """These settings as `TrainEngine` takes them (warm-up is the trainer's schedule, not the engine's)."""
        return dict(weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, compute_dtype=compute_dtype,
                    micro_batch_tokens=self.micro_batch_tokens, gradient_checkpointing=self.gradient_checkpointing)


@dataclass
class LearnerConfig(EngineSettings):
    lr: float = F(2e-4, "Policy AdamW learning rate.", lo=0.0, hi=1.0)
    critic_lr: float = F(1e-3, "Separate critic learning rate.", lo=0.0, hi=1.0)
    epochs: int = F(1, "Passes over each rollout batch (PPO epochs).", lo=1)
    minibatch_size: int = F(512, "Sequences per optimizer step; the step's N sequences are split into "
                            "ceil(N / minibatch_size) minibatches per epoch.", lo=1)


@dataclass
class LoraConfig:
    rank: int = F(0, "LoRA rank of the adapters (peft); 0 = full fine-tuning. Only the adapters train and are "
                  "checkpointed (a reward model's new score head trains in full beside them); saved models and "
                  "generators get the merged weights (checksummed as always). RL: the reference is the base "
                  "without adapters, so no reference actor runs; the separate critic trains in full.", lo=0)
    alpha: float = F(16.0, "Adapter scale: the update to a weight is (alpha / rank) * B @ A.", lo=0.0)
    dropout: float = F(0.0, "Dropout on the adapter path. RL runs refuse > 0: the learner's two forwards of a "
                       "sample (pi_old, pi) would draw different masks, as model.disable_dropout avoids for the "
                       "base.", lo=0.0, hi=1.0)
    target_modules: list = F(None, "Names of the modules that get adapters, e.g. [q_proj, v_proj]; [all-linear] = "
                             "every linear layer but the output layer.", factory=lambda: ["all-linear"])


@dataclass
class ResourcesConfig:
    num_cpus: Optional[float] = F(None, "CPUs of the local Ray started when no cluster address is given; null "
                                  "= all of this machine's.", lo=1)
    rollout_workers: int = F(1, "N generators; each gets a contiguous shard of the step's prompts.", lo=1)
    reward_scorers: int = F(1, "M reward scorers; each scores a shard of the completions.", lo=1)
    cpus_per_rollout_worker: float = F(1.0, "CPU share reserved per generator.", lo=0.0)
    gpus_per_rollout_worker: float = F(0.0, "GPU share per generator.", lo=0.0)
    cpus_per_reward_scorer: float = F(0.25, "CPU share per reward scorer.", lo=0.0)
    gpus_per_reward_scorer: float = F(0.0, "GPU share per reward scorer (its reward models run on it).", lo=0.0)
    learners: int = F(1, "K data-parallel learners (a gloo/NCCL group): each takes 1/K of every minibatch and "
                      "gradients are summed before the step, so K learners update exactly like one.", lo=1)
    cpus_per_learner: float = F(1.0, "CPU share of each learner.", lo=0.0)
    gpus_per_learner: float = F(0.0, "GPU share of each learner.", lo=0.0)
    cpus_per_reference: float = F(0.25, "CPU share of the reference actor (started when kl_coef > 0, unless "
                                  "the learners hold the reference: LoRA, or sharded learners).",
                                  lo=0.0)
    torch_threads: int = F(0, "Intra-op threads per actor; 0 = round(its CPU share), at least 1.", lo=0)
    placement_strategy: str = F("PACK", "Placement group strategy for all actors.",
                                choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    weight_sync: str = F("collective", "How new weights reach the generators: `collective` broadcasts from learner "
                         "rank 0 over a gloo/NCCL group (falls back to the object store for a step when a member "
                         "died, and rebuilds the group); `object_store` sends a checksummed packet through Ray.",
                         choices=("collective", "object_store"))
    collective_backend: str = F("auto", "torch.distributed backend of the learner and weight groups; auto = "
                                "nccl on GPU, gloo on CPU.", choices=("auto", "gloo", "nccl"))
    collective_timeout_s: float = F(120.0, "Seconds a collective waits for a member before it fails.", lo=1)


@dataclass
class TrainConfig:
    steps: int = F(200, "Training steps (one rollout batch and its updates each).", lo=1)
    time_budget_s: Optional[float] = F(None, "Stop after this many seconds of training (a final eval still "
                                       "runs); null = no limit.", lo=1)
    eval_every: int = F(10, "Evaluate held-out exact match (with env.name: episode success) every N steps (and at the "
                        "start and end).", lo=1)
    eval_every_s: Optional[float] = F(None, "Also evaluate once this many training seconds passed since the "
                                      "last eval (for curves over time); null = by steps only.", lo=1)
    seed: int = F(0, "Seed of torch, sampling and the prompt order.")
    output_dir: str = F("runs/grpo", "Run directory: resolved config, checkpoints, MLflow store, plots, model.")
    log_samples_every: int = F(20, "Log a Parquet table of rollouts to MLflow every N steps; 0 = never.", lo=0)


@dataclass
class CheckpointConfig:
    every: int = F(25, "Checkpoint every N steps (and at the end); 0 = only at the end.", lo=0)
    keep_last: int = F(2, "Checkpoints kept on disk.", lo=1)
    recoveries: int = F(3, "Times a run restarts its actors from the latest checkpoint when the learner or "
                        "reference dies (dead generators and scorers are restarted in place); 0 = fail.", lo=0)


@dataclass
class TrackingConfig:
    tracking_uri: Optional[str] = F(None, "MLflow store; null = $MLFLOW_TRACKING_URI or a sqlite file in the run "
                                    "directory.")
    experiment: str = F("rlpipe", "MLflow experiment name.")
    run_name: Optional[str] = F(None, "MLflow run name; null = the output directory's name.")
    parent_run_id: Optional[str] = F(None, "MLflow run to nest this run under (a sweep sets it to its parent run); "
                                     "null = a top-level run.")
    plot: bool = F(True, "Write reward/accuracy curves as a PNG at the end.")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------- parsing

def _allowed_types(tp: Any) -> tuple[list[type], bool]:
    """(concrete types, optional?) of an annotation like Optional[float] or list."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        concrete = [a for a in args if a is not type(None)]
        return [typing.get_origin(a) or a for a in concrete], type(None) in args
    return [origin or tp], False


def _coerce(name: str, value: Any, tp: Any, meta: dict) -> Any:
    kinds, optional = _allowed_types(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: null is not allowed; expected {kinds[0].__name__}")
    kind = kinds[0]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        value = int(value)
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
    elif kind is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta.get("lo"), meta.get("hi")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"{name}: {value!r} is out of range; allowed {bounds}")
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config field {prefix}{unknown[0]}; valid fields in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(known)}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", data[name], hints[name], dict(f.metadata))
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """A command-line override value: YAML scalar/list syntax (`0.1`, `true`, `null`, `[a, b]`)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def resolve_preset(path_or_name: str) -> str:
    """A config file path, or the name of a shipped preset (`grpo`, `ppo`, ...)."""
    if os.path.exists(path_or_name):
        return path_or_name
    preset = os.path.join(PRESET_DIR, f"{path_or_name}.yaml")
    if os.path.exists(preset):
        return preset
    names = sorted(p[:-5] for p in os.listdir(PRESET_DIR) if p.endswith(".yaml"))
    raise ConfigError(f"config {path_or_name!r} is neither a file nor a preset; presets: {', '.join(names)}")


def load_config(path: str | None = None, overrides: list[str] | tuple = (), base: dict | None = None) -> RunConfig:
    """Defaults <- YAML file (or preset name) <- `a.b=value` overrides, then validated."""
    tree: dict = json.loads(json.dumps(base)) if base else {}
    if path:
        file = resolve_preset(path)
        with open(file) as fh:
            try:
                loaded = yaml.safe_load(fh) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{file}: not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: expected a mapping of sections at the top level")
        for section, values in loaded.items():
            if isinstance(values, dict) and isinstance(tree.get(section), dict):
                tree[section].update(values)
            else:
                tree[section] = values
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. algorithm.clip_range=0.1")
        key, _, value = item.partition("=")
        set_dotted(tree, key.strip(), _parse_scalar(value))
    return validate(_build(RunConfig, tree, ""))


def validate(cfg: RunConfig) -> RunConfig:
    """Checks that span fields. Names live in registries, imported here lazily to keep the CLI quick; the
    generation backend's name is checked where its room registers them (`pipeline.rollout.check_backend`,
    called by preflight), so that config imports no room above it."""
    from pipeline.algorithms.advantages import ADVANTAGE_ESTIMATORS

    if cfg.algorithm.name not in ADVANTAGE_ESTIMATORS:
        raise ConfigError(f"algorithm.name: {cfg.algorithm.name!r} is not an estimator; valid: "
                          f"{', '.join(ADVANTAGE_ESTIMATORS.names())}")
    if cfg.reward.weights is not None and len(cfg.reward.weights) != len(cfg.reward.functions):
        raise ConfigError(f"reward.weights: {len(cfg.reward.weights)} weights for "
                          f"{len(cfg.reward.functions)} functions; give one per function or null")
    if not cfg.reward.functions and not cfg.reward.models:
        raise ConfigError("reward.functions: empty and no reward.models; give a reward function or a reward model")
    for i, m in enumerate(cfg.reward.models):
        _check_reward_model_entry(i, m)
    if ADVANTAGE_ESTIMATORS.meta(cfg.algorithm.name).get("needs_groups") and cfg.rollout.samples_per_prompt < 2:
        raise ConfigError(f"rollout.samples_per_prompt: {cfg.algorithm.name} compares samples within a group; "
                          "use 2 or more")
    ro = cfg.rollout
    if ro.backend == "vllm" and (ro.top_p < 1.0 or ro.top_k > 0) and ro.temperature != 1.0:
        raise ConfigError(f"rollout.temperature: vLLM reports log-probs before temperature or after top_p/top_k "
                          f"truncation, so with top_p={ro.top_p}, top_k={ro.top_k} at temperature {ro.temperature} "
                          "neither is the policy the learner trains; set rollout.temperature=1, or top_p=1 and "
                          "top_k=0, or rollout.backend=hf")
    a = cfg.algorithm
    if a.dual_clip is not None and a.dual_clip <= 1.0:
        raise ConfigError(f"algorithm.dual_clip: {a.dual_clip} must be > 1 (it bounds the loss at c * |A| for "
                          "negative advantages); use e.g. 3.0, or null to turn it off")
    if a.kl_coef > 0 and not a.kl_in_reward and a.kl_estimator == "k1":
        raise ConfigError("algorithm.kl_estimator: k1 as a loss term has zero expected gradient (E[grad log pi] = 0), "
                          "so it would not regularise anything; in the loss use k2 (gradient of KL(pi||ref)), k3 or "
                          "k3+, or set algorithm.kl_in_reward=true to use k1 in the reward")
    if cfg.rollout.max_staleness and a.old_logprobs == "sampler":
        raise ConfigError("algorithm.old_logprobs: sampler with rollout.max_staleness > 0 would clip against the "
                          "stale policy that sampled; use learner (or auto)")
    if cfg.rollout.max_staleness and a.tis_cap is None:
        raise ConfigError("algorithm.tis_cap: asynchronous rollouts (rollout.max_staleness > 0) train on samples "
                          "from older policies; set the truncation of pi_old / pi_behaviour, e.g. tis_cap=2.0")
    if a.tis_cap is not None and not learner_old_logprobs(cfg):
        raise ConfigError("algorithm.tis_cap: importance weights pi_old / pi_sampler are 1 when pi_old is the "
                          "sampler's own log-probs; set algorithm.old_logprobs=learner, or tis_cap=null")
    if cfg.lora.rank and cfg.lora.dropout > 0:
        raise ConfigError(f"lora.dropout: {cfg.lora.dropout} would draw new masks in the pi_old pass and again in the "
                          "update, so their ratio is not 1 at lr 0, and the generators get the dropout-free merge; "
                          "set lora.dropout=0 (RL disables the model's dropout for the same reason)")
    if cfg.env.name:
        _check_env_against(cfg)
    check_engine_layout(cfg.learner, cfg.lora, cfg.resources.learners, cfg.model.dtype,
                        {"parallel": "learner.parallel", "cpu_offload": "learner.cpu_offload",
                         "learners": "resources.learners", "dtype": "model.dtype", "lora": "lora."})
    if cfg.learner.minibatch_size < cfg.resources.learners:
        raise ConfigError(f"learner.minibatch_size: {cfg.learner.minibatch_size} sequences cannot be split over "
                          f"resources.learners={cfg.resources.learners} learners; use at least one per learner")
    return cfg


def _check_env_against(cfg: RunConfig) -> None:
    """Settings an environment's episodes would silently ignore."""
    if cfg.reward.models or cfg.reward.normalize or cfg.reward.clip is not None:
        raise ConfigError("reward.models / reward.normalize / reward.clip: with env.name the environment's rewards are "
                          "the score and the reward section is not used; remove them")
    if cfg.env.max_episode_tokens < (cfg.env.max_turn_tokens or cfg.rollout.max_new_tokens):
        raise ConfigError(f"env.max_episode_tokens: {cfg.env.max_episode_tokens} is less than one turn's "
                          f"{cfg.env.max_turn_tokens or cfg.rollout.max_new_tokens} tokens; raise it")


REWARD_MODEL_KEYS = {"path": str, "weight": (int, float), "batch_size": int, "dtype": str, "name": str}


def _check_reward_model_entry(i: int, entry: Any) -> None:
    example = "e.g. {path: runs/reward_model/model, weight: 1.0, batch_size: 64}"
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ConfigError(f"reward.models[{i}]: {entry!r} is not a mapping with a path; {example}")
    for key, value in entry.items():
        if key not in REWARD_MODEL_KEYS:
            raise ConfigError(f"reward.models[{i}].{key}: unknown key; valid: {', '.join(REWARD_MODEL_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, REWARD_MODEL_KEYS[key]):
            raise ConfigError(f"reward.models[{i}].{key}: {value!r} has the wrong type; {example}")
    if entry.get("batch_size", 1) < 1:
        raise ConfigError(f"reward.models[{i}].batch_size: {entry['batch_size']} must be >= 1")
    if entry.get("dtype", "float32") not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"reward.models[{i}].dtype: {entry['dtype']!r} is not one of float32, bfloat16, float16")


def pi_old_source(cfg: RunConfig, batch_size: int) -> str:
    """Where a batch of `batch_size` rows takes pi_old from: "update" (the update's own forward, when it is one
    optimizer step: `old_logprobs_from_update`), "learner" (a learner pass before the update), or "sampler"
    (the generators' log-probs). The driver decides it once per batch (`TrainBatch.pi_old`)."""
    if old_logprobs_from_update(cfg, batch_size):
        return "update"
    return "learner" if learner_old_logprobs(cfg) else "sampler"


def old_logprobs_from_update(cfg: RunConfig, batch_size: int) -> bool:
    """Whether a learner-computed pi_old can be the update's own forward, detached: the update is one optimizer
    step over all `batch_size` rows, so its forward runs on the parameters pi_old is defined by, and nothing
    needs pi_old before the update (the KL-in-reward term does)."""
    lc, a = cfg.learner, cfg.algorithm
    return (learner_old_logprobs(cfg) and lc.epochs == 1 and batch_size <= lc.minibatch_size
            and not (a.kl_in_reward and a.kl_coef > 0))


def learner_old_logprobs(cfg: RunConfig) -> bool:
    """Whether pi_old comes from a learner forward (True) or from the sampler (`algorithm.old_logprobs`)."""
    mode = cfg.algorithm.old_logprobs
    return mode == "learner" or (mode == "auto" and (cfg.model.dtype != "float32" or cfg.rollout.backend != "hf"
                                                     or cfg.rollout.max_staleness > 0))


def learner_reference(cfg: RunConfig) -> bool:
    """Whether log pi_ref comes from the learners rather than from a reference actor holding a whole second
    copy of the model: a LoRA policy's base (adapters off), or a frozen reference sharded between sharded
    learners."""
    return cfg.algorithm.kl_coef > 0 and (cfg.lora.rank > 0 or learners_sharded(cfg))


def check_engine_layout(engine: EngineSettings, lora: LoraConfig, learners: int, dtype: str,
                        names: dict[str, str]) -> None:
    """The engine settings' conflicts, for RL and the supervised commands alike; `names` spells each setting
    as the caller's user writes it (parallel, cpu_offload, learners, dtype, and the lora section's prefix)."""
    n = names
    if lora.rank and not lora.target_modules:
        raise ConfigError(f"{n['lora']}target_modules: empty; name the modules that get adapters, e.g. [q_proj, "
                          "v_proj], or [all-linear]")
    if engine.parallel == "shard" and lora.rank:
        raise ConfigError(f"{n['parallel']}: shard with {n['lora']}rank > 0 is not supported; LoRA's adapters are "
                          f"small, train them replicated ({n['parallel']}=replicate)")
    if engine.cpu_offload and not (engine.parallel == "shard" and learners > 1):
        raise ConfigError(f"{n['cpu_offload']} offloads the shards of sharded learners: set {n['parallel']}=shard "
                          f"and {n['learners']} > 1, or {n['cpu_offload']}=false")
    if engine.parallel == "shard" and dtype == "float16":
        raise ConfigError(f"{n['parallel']}: shard runs in bfloat16 or float32 (float16's loss scaler does not "
                          f"shard); set {n['dtype']}=bfloat16")


def learners_sharded(cfg: RunConfig) -> bool:
    """True when the learners shard the model between them (FSDP2): more than one, learner.parallel=shard."""
    return cfg.learner.parallel == "shard" and cfg.resources.learners > 1


def config_reference_markdown() -> str:
    """The config reference (docs/configuration.md), generated from the one place fields are documented."""
    lines = ["| field | default | what it does |", "|---|---|---|"]
    hints = typing.get_type_hints(RunConfig)
    for section in dataclasses.fields(RunConfig):
        cls = hints[section.name]
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            meta = f.metadata
            extra = f" One of: {', '.join(meta['choices'])}." if meta.get("choices") else ""
            lines.append(f"| `{section.name}.{f.name}` | `{json.dumps(default)}` | {meta['doc']}{extra} |")
    return "\n".join(lines)
