"""Shared fixtures: a tiny task and model built once per session, and a local Ray cluster."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory):
    """A 2-digit addition task with a tiny (untrained) model folder: {"data": {...paths}, "model": path}."""
    from pipeline.data import make_arithmetic_task
    from pipeline.models import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    data = make_arithmetic_task(str(root / "data"), digits=2, n_labelled=200, n_rl=2000, n_eval=100, seed=0)
    model = build_tiny_model(str(root / "model"), hidden_size=32, num_layers=2, num_heads=2,
                             intermediate_size=64, seed=0)
    return {"data": data, "model": model, "root": root}


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster with 4 logical CPUs (actors take fractional shares)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    yield ray
    ray.shutdown()
