"""Weight-sync time against model size: the collective broadcast vs the Ray object store.

For each model size it starts the run's real actors (one learner, N generators, from `actors.pools`),
then times R syncs of each kind, end to end as the driver sees them:
- collective: learner rank 0 checksums its weights and broadcasts them over the gloo/NCCL "weights"
  group; each generator receives, loads, re-checksums and compares;
- object store: the learner packs numpy arrays with a checksum into the object store; each generator
  fetches, verifies, loads and re-checksums.
Both include the checksums (about half the time on CPU for large models: blake2b runs at ~1 GB/s);
`checksum_s` is that part alone, as the learner measures it.

    python benchmarks/weight_sync.py [--sizes 1M,13M,101M] [--workers 2] [--repeats 5] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (hidden size, layers, MLP size) of the Llama the project builds; ~12 * layers * hidden^2 params
SIZES = {"1M": (128, 4, 344), "13M": (512, 4, 1376), "101M": (1024, 8, 2752), "340M": (1536, 12, 4096)}


def time_syncs(model_path: str, workers: int, repeats: int, gpus: float = 0.0) -> dict:
    import ray

    from actors.learner_group import LearnerGroup
    from actors.pools import start_actors
    from actors.weight_sync import WeightSync
    from pipeline.collective import SYNC_GROUP
    from pipeline.config import load_config

    cfg = load_config("grpo", [f"model.path={model_path}", f"resources.rollout_workers={workers}",
                               "resources.cpus_per_rollout_worker=0.5", "resources.cpus_per_learner=0.5",
                               f"resources.gpus_per_learner={gpus}", f"resources.gpus_per_rollout_worker={gpus}",
                               "algorithm.kl_coef=0", "resources.weight_sync=collective"])
    pools = start_actors(cfg)
    try:
        pools.wait_ready()
        learner, gens = pools.learner, pools.generators
        WeightSync(cfg, LearnerGroup(pools.learners), gens, gather=None).connect()   # the broadcast group
        spec = ray.put(ray.get(learner.weights_spec.remote()))

        def collective() -> float:
            start = time.perf_counter()
            sent, *sums = ray.get([learner.broadcast_weights.remote(),
                                   *[g.receive_weights.remote(SYNC_GROUP, spec, 0) for g in gens]])
            assert set(sums) == {sent["checksum"]}
            return time.perf_counter() - start

        def object_store() -> float:
            start = time.perf_counter()
            packet = learner.export_weights.remote()
            sums = ray.get([g.set_weights.remote(packet) for g in gens])
            assert len(set(sums)) == 1
            del packet
            return time.perf_counter() - start

        def checksum() -> float:
            start = time.perf_counter()
            ray.get(learner.checksum.remote())
            return time.perf_counter() - start

        out = {}
        for name, fn in (("collective_s", collective), ("object_store_s", object_store), ("checksum_s", checksum)):
            fn()                                                           # warm-up
            out[name] = statistics.median(fn() for _ in range(repeats))
        out["mbytes"] = sum(v.numel() * v.element_size() for v in _state(model_path).values()) / 2**20
        return out
    finally:
        pools.shutdown()


def _state(model_path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_path, "model.safetensors"))


def main(argv: list[str] | None = None) -> list[dict]:
    import ray

    from pipeline.small_models import build_tiny_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1M,13M,101M", help=f"comma-separated, from {', '.join(SIZES)}")
    p.add_argument("--workers", type=int, default=2, help="rollout workers receiving the weights")
    p.add_argument("--repeats", type=int, default=5, help="timed syncs per kind (median reported)")
    p.add_argument("--gpus", type=float, default=0.0, help="GPU share per learner and generator (NCCL when > 0)")
    p.add_argument("--address", default=None, help="Ray cluster to use; default a local Ray")
    p.add_argument("--out", default=None, help="write weight_sync.json and .md here")
    args = p.parse_args(argv)
    ray.init(address=args.address, include_dashboard=False, logging_level="WARNING",
             **({} if args.address else {"num_cpus": max(2, args.workers),
                                         "runtime_env": {"env_vars": {"PYTHONPATH": os.getcwd()}}}))
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in args.sizes.split(","):
                hidden, layers, mlp = SIZES[size]
                path = build_tiny_model(os.path.join(tmp, size), hidden_size=hidden, num_layers=layers,
                                        num_heads=max(4, hidden // 128), intermediate_size=mlp)
                rows.append({"model": size, **time_syncs(path, args.workers, args.repeats, args.gpus)})
                print(_table(rows[-1:], header=len(rows) == 1), flush=True)
    finally:
        ray.shutdown()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "weight_sync.json"), "w") as fh:
            json.dump(rows, fh, indent=2)
        with open(os.path.join(args.out, "weight_sync.md"), "w") as fh:
            fh.write(_table(rows) + "\n")
    return rows


def _table(rows: list[dict], header: bool = True) -> str:
    lines = ["| model | MiB | collective s | object store s | checksum s | collective / object store |",
             "|---|---|---|---|---|---|"] if header else []
    for r in rows:
        lines.append(f"| {r['model']} | {r['mbytes']:.1f} | {r['collective_s']:.4f} | {r['object_store_s']:.4f} | "
                     f"{r['checksum_s']:.4f} | {r['collective_s'] / r['object_store_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
