"""Per-process torch setup shared by every role: threads, seeds, determinism, the device.

Actors share a machine's cores, so each process takes its own thread count; seeds are derived from the
run seed so that a resumed run draws exactly what the uninterrupted one would have drawn.
"""
from __future__ import annotations

import torch


def setup_torch(threads: int, seed: int | None = None, deterministic: bool = False) -> None:
    """Intra-op threads for this process (at least 1), the torch seed, and optionally deterministic
    algorithms (same seed, same machine -> same numbers; `warn_only` because some CPU kernels have no
    deterministic variant and must not stop a run)."""
    torch.set_num_threads(max(1, threads))
    if seed is not None:
        torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(device: str = "auto") -> str:
    """`auto` -> "cuda" when this process sees a GPU, else "cpu"; any other value is returned as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def derive_seed(*parts: int) -> int:
    """A reproducible seed from (run seed, step, worker, ...): distinct for distinct tuples in practice,
    the same on every process that computes it (so K learners shuffle minibatches alike)."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p) * 7_919 + 104_729) % (2**31 - 1)
    return seed
