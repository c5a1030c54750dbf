"""The benchmarks' own code: rollout scaling, learner memory, async overlap and the GPU check, each at a toy size."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_worker_resources_split_the_cpus_or_take_a_fixed_share():
    resources = load_bench("rollout_scaling").worker_resources
    assert resources(1, 2.0, 0.0, 0) == (2.0, 2)        # one worker gets both cores as threads
    assert resources(2, 2.0, 0.0, 0) == (1.0, 1)
    assert resources(4, 2.0, 0.0, 0) == (0.5, 1)        # at least one thread, so 4 threads on 2 cores
    assert resources(4, 2.0, 1.0, 0) == (1.0, 1)        # fixed share, whatever N
    assert resources(1, 2.0, 0.0, 3) == (2.0, 3)        # explicit threads win


@pytest.mark.ray
def test_rollout_scaling_table_has_a_row_per_worker_count(tiny_task, tmp_path):
    bench = load_bench("rollout_scaling")
    B, G, T = 4, 2, 3
    summary = bench.main(["--workers", "1,2", "--repeats", "1", "--model", tiny_task["model"],
                          "--data", os.path.dirname(tiny_task["data"]["train"]), "--cpus-per-worker", "0.5",
                          "--out", str(tmp_path), f"rollout.prompts_per_step={B}",
                          f"rollout.samples_per_prompt={G}", f"rollout.max_new_tokens={T}"])
    rows = summary["rows"]
    assert [r["workers"] for r in rows] == [1, 2]
    assert [(r["cpus_per_worker"], r["threads_per_worker"]) for r in rows] == [(0.5, 1), (0.5, 1)]
    for r in rows:
        assert len(r["times_s"]) == 1 and r["samples_per_s"] == pytest.approx(B * G / r["median_s"])
        assert 0 < r["tokens"][0] <= B * G * T and r["tokens_per_s"] > 0
    assert rows[0]["speedup"] == 1.0 and rows[1]["efficiency"] == pytest.approx(rows[1]["speedup"] / 2)
    assert json.loads((tmp_path / "rollout_scaling.json").read_text())["rows"][1]["workers"] == 2
    table = (tmp_path / "rollout_scaling.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table if line.startswith("| ") and line[2].isdigit()] == ["1", "2"]


@pytest.mark.unit
def test_learner_memory_measures_full_shard_and_lora_in_fresh_processes(tmp_path):
    bench = load_bench("learner_memory")
    summary = bench.main(["--sizes", "3M", "--batch", "2", "--seq", "16", "--steps", "1", "--lora-rank", "4",
                          "--out", str(tmp_path)])
    full, shard, lora = summary["rows"]
    assert [r["mode"] for r in summary["rows"]] == ["full", "shard", "lora"]
    assert not [r["error"] for r in summary["rows"] if "error" in r]
    assert shard["ranks"] == 2 and shard["parameters"] == full["parameters"]
    assert shard["optimizer_gib"] == pytest.approx(full["optimizer_gib"] / 2, rel=0.05)   # each rank: its half
    assert 2.5e6 < full["parameters"] < 4e6 and full["trainable"] == full["parameters"]
    assert 0 < lora["trainable"] < 0.1 * full["trainable"]                 # only the adapters train
    assert lora["optimizer_gib"] < 0.1 * full["optimizer_gib"]             # AdamW holds two moments of each
    assert full["optimizer_gib"] == pytest.approx(2 * 4 * full["parameters"] / 2**30, rel=0.01)
    assert full["peak_rss_gib"] >= full["rss_before_model_gib"] > 0     # the peak may be the imports' own
    table = (tmp_path / "learner_memory.md").read_text()
    assert "| 3M | full | 1 |" in table and "| 3M | shard | 2 |" in table and "| 3M | lora | 1 |" in table


@pytest.mark.unit
def test_learner_memory_largest_model_from_a_line_fitted_to_its_rows():
    bench = load_bench("learner_memory")
    gib = 2**30

    def row(mode, n, ranks=1):     # memory above start: 0.25 GiB plus 16 (full), 8 (shard) or 4 (lora) B/param
        per = {"full": 16, "shard": 8, "lora": 4}[mode]
        return {"mode": mode, "parameters": n, "ranks": ranks, "rss_before_model_gib": 0.5,
                "peak_rss_gib": 0.5 + 0.25 + per * n / gib}

    rows = [row(m, n, 2 if m == "shard" else 1) for n in (1e7, 5e7, 2e8) for m in ("full", "shard", "lora")]
    fits = bench.largest_fits(rows + [{"mode": "full", "error": "killed"}], budget_gib=16.75)
    assert fits["full"]["per_param_bytes"] == pytest.approx(16) and fits["full"]["fixed_gib"] == pytest.approx(0.25)
    assert fits["full"]["parameters"] == pytest.approx((16.75 - 0.75) * gib / 16)          # 1.07 B
    assert fits["lora"]["parameters"] == pytest.approx(4 * fits["full"]["parameters"])
    # two sharded learners on one machine: each half the bytes, both count against the same budget
    assert fits["shard"]["learners"] == 2
    assert fits["shard"]["parameters"] == pytest.approx((16.75 / 2 - 0.75) * gib / 8)
    for n in (1.5e7, 3e8, 1.2e9, 4.5e9):
        params = bench.parameters_of(*bench.shape_of(bench.shape_for(n)))
        assert 0.85 * n < params <= n, n                       # the checked model is at most the fitted size


@pytest.mark.slow
def test_async_overlap_runs_each_mode_and_reports_its_staleness(tiny_task, tmp_path):
    bench = load_bench("async_overlap")
    warm = tmp_path / "demo"
    (warm / "data").mkdir(parents=True)
    os.symlink(tiny_task["model"], warm / "warm")
    for split in ("train", "eval"):
        os.symlink(tiny_task["data"][split], warm / "data" / f"{split}.parquet")
    summary = bench.main(["--warm", str(warm), "--minutes", "0.1", "--staleness", "0,1", "--eval-every-s", "2",
                          "--eval-size", "20", "--out", str(tmp_path / "out")])
    sync, stale = summary["rows"]
    assert (sync["max_staleness_seen"], stale["max_staleness_seen"]) == (0, 1)
    assert sync["steps"] > 1 and stale["steps"] > 1 and sync["eval_curve"] and stale["eval_curve"]
    table = (tmp_path / "out" / "async_overlap.md").read_text()
    assert "| synchronous | 1 |" in table and "| async, staleness 1 | 1 |" in table
    assert (tmp_path / "out" / "async_overlap.png").stat().st_size > 10_000


@pytest.mark.slow
def test_gpu_check_runs_every_section_but_vllm_at_a_toy_shape_and_keeps_its_ratios_within_the_limits(tmp_path):
    """The GPU check's own code on this CPU (its sections fall back to float32 and gloo), in a process of its own:
    its shard section makes a default process group, which must not outlive it in the test process."""
    out = tmp_path / "out"
    subprocess.run([sys.executable, os.path.join(BENCHMARKS, "gpu_check.py"), "--shape", "tiny", "--threads", "1",
                    "--sections", "peaks,rollout,learner,shard,sync", "--out", str(out)], check=True, timeout=600)
    results = json.loads((out / "gpu_check.json").read_text())
    sec = results["sections"]
    assert list(sec) == ["peaks", "rollout", "learner", "shard", "sync"]
    assert not [name for name, figures in sec.items() if "error" in figures]
    assert sec["peaks"]["matmul_tflops"] > 0 and sec["peaks"]["bandwidth_gbs"] > 0
    hf = sec["rollout"]["hf"]
    assert 0 < hf["tokens_per_sample"] <= results["shape"]["new_tokens"] and 0 < hf["of_bound"] < 1
    assert 0 < sec["learner"]["mfu_of_measured_peak"] < 1 and sec["learner"]["trained_tokens_per_s"] > 0
    shard = sec["shard"]
    assert shard["replicated"]["policy_and_critic_parameters"] == shard["sharded"]["policy_and_critic_parameters"]
    sync = sec["sync"]
    assert sync["broadcast_backend"] == "gloo" and sync["broadcast_intact"] is True
    assert sync["gib"] >= sec["rollout"]["weight_gib"] and sync["object_store_s_per_gib"] > 0
    table = (out / "gpu_check.md").read_text()
    assert "| hf |" in table and "PPO step with a separate critic" in table and "gloo broadcast" in table


@pytest.mark.unit
def test_cost_growth_slope_is_the_exponent_of_a_power_law():
    slope = load_bench("cost_growth").slope
    assert slope([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)        # y = 3 x^2
    assert slope([10, 100], [5, 5]) == pytest.approx(0.0)
    assert slope([1, 4, 16], [8, 4, 2]) == pytest.approx(-0.5)


@pytest.mark.slow
def test_cost_growth_measures_every_stage_of_a_size_sweep_and_plots_it(tmp_path):
    results = load_bench("cost_growth").main(["--sweeps", "size", "--sizes", "0.8M,3M", "--repeats", "1",
                                              "--threads", "1", "--out", str(tmp_path), "--assets",
                                              str(tmp_path / "models")])
    small, large = results["sweeps"]["size"]
    assert small["parameters"] < large["parameters"]
    assert all(p[s] > 0 for p in (small, large) for s in ("generation", "scoring", "update", "sync"))
    assert large["step"] == pytest.approx(sum(large[s] for s in ("generation", "scoring", "update", "sync")))
    assert results["slopes"]["size"]["update"] > 0                       # a larger model's update costs more
    assert "| log-log slope |" in (tmp_path / "cost_growth.md").read_text()
    assert (tmp_path / "cost_growth.png").stat().st_size > 10_000
