"""Plain classes behind the rollout and reference actors. They run, and are tested, without Ray."""
from __future__ import annotations

import os

import torch

from pipeline.batch import Rollout
from pipeline.collective import GroupMember, receive_weights
from pipeline.config import ModelConfig, RolloutConfig
from pipeline.generation import GENERATION_BACKENDS
from pipeline.weights import WeightsPacket, model_checksum, unpack_weights


def setup_torch(threads: int, seed: int | None = None) -> None:
    """Intra-op threads per process: actors share the machine's cores, so each gets its own share."""
    torch.set_num_threads(max(1, threads))
    if seed is not None:
        torch.manual_seed(seed)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def step_seed(seed: int, step: int, worker: int) -> int:
    """A distinct, reproducible sampling seed per (run seed, step, worker): a resumed run resamples alike."""
    return (seed * 1_000_003 + step * 7_919 + worker * 104_729) % (2**31 - 1)


class RolloutGenerator(GroupMember):
    """Samples completions from the current policy through a generation backend."""

    def __init__(self, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, worker_index: int = 0,
                 seed: int = 0, threads: int = 1):
        from pipeline.models import load_causal_lm, load_tokenizer

        setup_torch(threads, seed)
        self.cfg = rollout_cfg
        self.worker_index = worker_index
        self.seed = seed
        device = resolve_device(model_cfg.device)
        model = load_causal_lm(model_cfg.path, dtype=model_cfg.dtype, device=device)
        model.eval()
        tokenizer = load_tokenizer(model_cfg.path)
        self.backend = GENERATION_BACKENDS.get(rollout_cfg.backend)(model, tokenizer)
        self.device = device
        self.version = 0

    def generate(self, prompts: list[str], group_ids: list[int], sample_index: list[int], step: int) -> Rollout:
        """prompts: (n,) one entry per sequence (each prompt already repeated G times)."""
        c = self.cfg
        out = self.backend.sample(prompts, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                  top_p=c.top_p, top_k=c.top_k, seed=step_seed(self.seed, step, self.worker_index))
        return Rollout(
            prompts=list(prompts), completions=list(out["completions"]),
            prompt_ids=out["prompt_ids"].cpu(), prompt_mask=out["prompt_mask"].cpu().bool(),
            completion_ids=out["completion_ids"].cpu(), completion_mask=out["completion_mask"].cpu().bool(),
            logprobs=out["logprobs"].float().cpu(),
            group_ids=torch.as_tensor(group_ids, dtype=torch.long),
            sample_index=torch.as_tensor(sample_index, dtype=torch.long),
            policy_version=self.version,
        )

    def count_correct(self, prompts: list[str], answers: list[str], max_new_tokens: int) -> int:
        """Greedy exact-match hits on an eval shard (summed over workers by the driver)."""
        if not prompts:
            return 0
        completions = self.backend.greedy(prompts, max_new_tokens=max_new_tokens)
        return sum(c.strip() == str(a).strip() for c, a in zip(completions, answers))

    def set_weights(self, packet: WeightsPacket) -> str:
        self.backend.load_state_dict(unpack_weights(packet))
        self.version = packet.version
        return self.weights_checksum()

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
        return model_checksum(self.backend.model)

    def pid(self) -> int:
        return os.getpid()


class ReferencePolicy:
    """The frozen initial policy; gives log pi_ref of each completion token for the KL term."""

    def __init__(self, model_cfg: ModelConfig, temperature: float, threads: int = 1):
        from pipeline.models import load_causal_lm

        setup_torch(threads)
        self.temperature = temperature
        self.device = resolve_device(model_cfg.device)
        self.model = load_causal_lm(model_cfg.path, dtype=model_cfg.dtype, device=self.device)
        self.model.eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, r: Rollout) -> torch.Tensor:
        """(N, T) float32 log-probs of the completion tokens under the reference."""
        from pipeline.models import completion_forward

        d = self.device
        out = completion_forward(self.model, r.prompt_ids.to(d), r.prompt_mask.to(d), r.completion_ids.to(d),
                                 r.completion_mask.to(d), temperature=self.temperature)
        return out["logprobs"].float().cpu()
