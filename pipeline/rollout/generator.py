"""The rollout generator: the plain class behind a rollout actor. It samples completions from the current
policy through a generation backend, evaluates greedy exact match, and takes new weights verified by
version and checksum. Runs, and is tested, without Ray."""
from __future__ import annotations

import functools

import torch

from pipeline.batch import Rollout
from pipeline.collective import GroupMember, receive_weights
from pipeline.config import EnvConfig, ModelConfig, RolloutConfig, VLLMConfig
from pipeline.rollout.generation import GENERATION_BACKENDS
from pipeline.data.prompt_format import PromptFormat
from pipeline.rewards.functions import exact_match
from pipeline.torch_env import derive_seed, resolve_device, setup_torch
from pipeline.weights import WeightsPacket, state_checksum, unpack_weights


class RolloutGenerator(GroupMember):
    """Samples completions from the current policy through a generation backend."""

    def __init__(self, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, chat_template: bool = False,
                 worker_index: int = 0, seed: int = 0, threads: int = 1, engine_cfg: VLLMConfig | None = None,
                 env_cfg: EnvConfig | None = None):
        from pipeline.models import load_tokenizer

        setup_torch(threads, seed)
        self.cfg = rollout_cfg
        self.worker_index = worker_index
        self.seed = seed
        self.device = resolve_device(model_cfg.device)
        prompt_format = self.prompt_format = PromptFormat(load_tokenizer(model_cfg.path), chat_template)
        self.env_cfg = env_cfg or EnvConfig()
        self.env_factory = None
        if self.env_cfg.name:
            from pipeline.envs import resolve_environment

            self.env_factory = functools.partial(resolve_environment(self.env_cfg.name), **self.env_cfg.args)
        self.backend = GENERATION_BACKENDS.get(rollout_cfg.backend).load(
            model_cfg, prompt_format, self.device, seed=derive_seed(seed, worker_index),
            engine_cfg=engine_cfg or VLLMConfig(),
            sampling=rollout_cfg)
        self.version = 0

    def generate(self, prompts: list, group_ids: list[int], sample_index: list[int], step: int) -> Rollout:
        """prompts: (n,) one entry per sequence (each prompt already repeated G times), text or messages."""
        c = self.cfg
        out = self.backend.sample(prompts, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                  top_p=c.top_p, top_k=c.top_k, seed=derive_seed(self.seed, step, self.worker_index))
        return Rollout(
            prompts=list(out["prompt_texts"]), completions=list(out["completions"]),
            prompt_ids=out["prompt_ids"].cpu(), prompt_mask=out["prompt_mask"].cpu().bool(),
            completion_ids=out["completion_ids"].cpu(), completion_mask=out["completion_mask"].cpu().bool(),
            logprobs=out["logprobs"].float().cpu(),
            group_ids=torch.as_tensor(group_ids, dtype=torch.long),
            sample_index=torch.as_tensor(sample_index, dtype=torch.long),
            policy_version=self.version,
        )

    def generate_episodes(self, rows: list[dict], group_ids: list[int], sample_index: list[int], step: int) -> Rollout:
        """rows: (n,) dataset rows, each already repeated G times: one episode of the environment each, run by the
        agent loop (`pipeline.rollout.agent`)."""
        from pipeline.rollout.agent import episodes_to_rollout, run_episodes

        if self.env_factory is None:
            raise RuntimeError("generate_episodes needs env.name: this generator was started without an environment")
        episodes = run_episodes(self.backend, self.prompt_format, self.env_factory, rows, self.env_cfg, self.cfg,
                                derive_seed(self.seed, step, self.worker_index))
        tokenizer = self.prompt_format.tokenizer
        return episodes_to_rollout(episodes, group_ids, sample_index, self.version, tokenizer.pad_token_id, tokenizer)

    def evaluate_episodes(self, rows: list[dict], k: int, step: int) -> list[list]:
        """k episodes of each held-out row -> per row, k (score, stop_reason, turns, tool calls); a placeholder's
        score is None."""
        from pipeline.rollout.agent import FAILED_STOPS, run_episodes

        episodes = run_episodes(self.backend, self.prompt_format, self.env_factory, [r for r in rows for _ in range(k)],
                                self.env_cfg, self.cfg, derive_seed(self.seed, step, self.worker_index, 7))
        out = [(None if e.stop_reason in FAILED_STOPS else sum(e.rewards), e.stop_reason, e.turns,
                e.counts["tool_calls"]) for e in episodes]
        return [out[i * k:(i + 1) * k] for i in range(len(rows))]

    def count_correct(self, prompts: list, answers: list[str], max_new_tokens: int) -> int:
        """Greedy exact-match hits on an eval shard (summed over generators by the driver)."""
        if not prompts:
            return 0
        completions = self.backend.greedy(prompts, max_new_tokens=max_new_tokens)
        return int(sum(exact_match(prompts, completions, answer=answers)))

    def set_weights(self, packet: WeightsPacket) -> str:
        """Load a packet whose bytes arrived intact; the checksum read back from the backend must be the
        learner's. -> that checksum."""
        self.backend.load_state_dict(unpack_weights(packet))
        checksum = self.weights_checksum()
        if checksum != packet.checksum:
            raise RuntimeError(f"generator {self.worker_index}: after loading weights version {packet.version} it "
                               f"holds checksum {checksum}, the learner sent {packet.checksum}")
        self.version = packet.version
        return checksum

    def receive_weights(self, group: str, spec: list[tuple[str, tuple, str]], version: int) -> str:
        """Take part in the learner's broadcast over process group `group`; verify version and checksum."""
        got_version, sent_checksum, state = receive_weights(self.group(group), spec, self.device)
        self.backend.load_state_dict(state)
        checksum = self.weights_checksum()
        if got_version != version or checksum != sent_checksum:
            raise RuntimeError(f"generator {self.worker_index}: broadcast weights are version {got_version} with "
                               f"checksum {checksum}; expected version {version} with checksum {sent_checksum}")
        self.version = version
        return checksum

    def weights_checksum(self) -> str:
        """Of the weights read back from the backend, not of what was sent."""
        return state_checksum(self.backend.state_dict())
