"""The tools demo (`rlpipe demo --task tools`): its task, its environment and one small end-to-end run."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from pipeline.demo.tools import KeyChain, chain, demonstration, hidden_table, make_tools_task


@pytest.mark.unit
def test_the_hidden_table_is_a_function_of_the_seed_with_chains_of_two_and_three_lookups():
    starts, hops, table = hidden_table(3)
    assert hidden_table(3) == (starts, hops, table) and hidden_table(4)[0] != starts
    assert len(set(starts)) == len(starts) and sorted(set(hops)) == [2, 3] and abs(sum(h == 3 for h in hops) -
                                                                                 len(hops) / 2) <= 1
    for key, h in list(zip(starts, hops))[:200]:
        results = chain(key, table)
        assert len(results) == h and results[-1].isdigit() and 100 <= int(results[-1]) <= 999
        assert all(r.isalpha() and len(r) == 3 and r not in starts for r in results[:-1])
    with pytest.raises(TypeError):
        table["new"] = "1"                       # read-only: every episode's environment shares it


@pytest.mark.unit
def test_splits_are_disjoint_and_the_demonstrations_are_two_lookups_but_two_of_three(tmp_path):
    paths = make_tools_task(tmp_path, n_demos=40, n_rl=300, n_eval=100, seed=5, long_demos=2)
    rows = {name: pq.read_table(path).to_pylist() for name, path in paths.items()}
    keys = {name: {r["prompt"] for r in split} for name, split in rows.items()}
    assert not (keys["demos"] & keys["train"] or keys["demos"] & keys["eval"] or keys["train"] & keys["eval"])
    assert sorted(r["hops"] for r in rows["demos"]) == [2] * 38 + [3] * 2
    assert {r["hops"] for r in rows["eval"]} == {2, 3} and "response" not in rows["train"][0]


@pytest.mark.unit
def test_a_demonstration_replayed_through_the_environment_is_paid_and_a_wrong_key_is_an_error_to_read():
    table = hidden_table(2)[2]
    key = hidden_table(2)[0][0]
    env = KeyChain(seed=2)
    row = {"prompt": f"{key}:", "answer": chain(key, table)[-1]}
    assert env.reset(row, seed=0) == f"{key}:"
    turns = demonstration(key, table)
    for said, heard in zip(turns[0::2], turns[1::2] + [None]):
        result = env.step(said["content"])
        if heard is None:
            assert result.done and result.reward == 1.0
        else:
            assert not result.done and result.observation == heard["content"] and result.info["tool_calls"] == 1
    env.reset(row, seed=0)
    missing = env.step("<call>get('zzzz')</call>")
    assert missing.observation.startswith("<error>KeyError") and not missing.done
    assert env.step("<answer>0</answer>").reward == 0.0
    assert env.schemas[0]["function"]["name"] == "get"


@pytest.mark.slow
def test_the_tools_demo_end_to_end_on_a_small_budget(tmp_path, capsys):
    from actors.demo import run_tools_demo

    out = tmp_path / "tools"
    results = run_tools_demo(str(out), seed=0, rl_steps=2, sft_steps=5, warm_steps=10, eval_rows=24)
    printed = capsys.readouterr().out
    saved = json.loads((out / "tools_results.json").read_text())
    assert saved["rl_steps"] == results["rl_steps"] == 2 and saved["sft_steps"] == 5 and saved["eval_rows"] == 24
    for who in ("start", "rl", "sft"):
        m = saved[who]
        assert 0.0 <= m["eval/success"] <= 1.0 and {"eval/success_2_lookups", "eval/success_3_lookups",
                                                    "eval/turns", "eval/tool_calls"} <= set(m)
    assert "GRPO through the environment, 2 steps ===" in printed and "the claim, RL ends above" in printed
    assert os.path.getsize(out / "tools_success.png") > 10_000 and (out / "grpo" / "final_model").is_dir()
    m = saved["minutes"]
    assert m["start"] > 0 and m["total"] >= m["start"] + m["rl"] + m["sft"]


@pytest.mark.unit
def test_the_per_seed_table_reports_the_difference_and_its_noise_by_hand():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "tools_seeds.py"
    spec = importlib.util.spec_from_file_location("tools_seeds", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    m = lambda s, s3, calls: {"eval/success": s, "eval/success_3_lookups": s3, "eval/tool_calls": calls}  # noqa: E731
    r = {"eval_rows": 500, "start": m(0.75, 0.5, 2.0), "sft": m(0.76, 0.52, 2.0), "rl": m(0.9, 0.8, 2.4),
         "minutes": {"total": 14.0, "start": 3.0, "rl": 7.0, "sft": 3.0}}
    # 2 * sqrt((0.9 * 0.1 + 0.76 * 0.24) / 500) = 2 * sqrt(0.0005448) = 0.04668
    assert bench.beyond_noise(r) == (pytest.approx(14.0), pytest.approx(4.668, abs=1e-3), True)
    r["rl"] = m(0.78, 0.55, 2.1)
    assert bench.beyond_noise(r)[2] is False                       # +2 points is inside the noise
    text = bench.table([(0, r)])
    assert "| 0 | 75.0% (50.0%) | 76.0% (52.0%) | **78.0% (55.0%)** | +2.0 (noise +-" in text and "NOT beyond" in text
    r2 = {**r, "start": m(0.25, 0.1, 2.0), "rl": m(0.9, 0.8, 2.4), "minutes": {**r["minutes"], "total": 20.0}}
    mean = bench.table([(0, r), (1, r2)]).splitlines()[-1]      # seeds' means and ranges
    assert mean == "| mean (range) | 50.0% (25-75) | 76.0% (76-76) | **84.0% (78-90)** | +8.0 (+2 to +14) |  | 17.0 (14-20) |"
