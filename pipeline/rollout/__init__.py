"""Rollout: generation backends (`generation`: the interface and `hf`; `vllm_backend`), the generator behind a
rollout actor, the frozen reference and greedy evaluation. The backends register here, where the room is assembled."""
from pipeline.rollout import generation, vllm_backend  # noqa: F401  each registers its backend by name
from pipeline.rollout.generation import GENERATION_BACKENDS


def check_backend(name: str) -> None:
    """One ConfigError unless `name` is a registered generation backend (rollout.backend)."""
    from pipeline.config import ConfigError

    if name not in GENERATION_BACKENDS:
        raise ConfigError(f"rollout.backend: {name!r} is not a generation backend; valid: "
                          f"{', '.join(GENERATION_BACKENDS.names())}")
