"""Tracking (a real sqlite MLflow store), checkpoints (real files) and plots (real PNGs)."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.checkpoint import (capture_rng_state, latest_checkpoint, load_checkpoint, restore_rng,
                                 save_checkpoint, save_hf_model)
from pipeline.plots import markdown_table, plot_comparison, plot_training_curves
from pipeline.tracking import ConsoleLog, Tracker, default_tracking_uri, flatten_config, format_duration

pytestmark = pytest.mark.unit


# -- tracking ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_uri(tmp_path_factory):
    """One sqlite store for the module: creating its tables costs ~1 s, so tests share it and use
    their own experiment names."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def test_flatten_config_dots_stringifies_and_truncates():
    flat = flatten_config({"algorithm": {"clip_range": 0.2, "estimator": "grpo", "nested": {"x": None}},
                           "lrs": [1e-6, 2e-6], "big": "a" * 7000, "empty": {}})
    assert flat["algorithm.clip_range"] == "0.2"
    assert flat["algorithm.estimator"] == "grpo"
    assert flat["algorithm.nested.x"] == "None"
    assert json.loads(flat["lrs"]) == [1e-6, 2e-6]
    assert flat["empty"] == "{}"
    assert len(flat["big"]) == 6000 and flat["big"].endswith("[truncated]")


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_tracker_logs_params_metrics_and_drops_non_finite(tmp_path, shared_uri):
    tracker = Tracker(tmp_path, experiment="params", run_name="r1", tracking_uri=shared_uri, tags={"k": "v"})
    tracker.log_params(flatten_config({f"group{i}": {"value": i} for i in range(150)}))  # > one batch
    assert tracker.log_metrics(0, {"reward/mean": 0.5, "policy/kl": float("nan")})
    assert tracker.log_metrics(1, {"reward/mean": np.float32(0.75), "policy/kl": torch.tensor(0.01)})
    tracker.finish()
    tracker.finish()  # idempotent

    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1" and run.data.tags["k"] == "v"
    assert len(run.data.params) == 150 and run.data.params["group149.value"] == "149"
    kl = tracker.client.get_metric_history(tracker.run_id, "policy/kl")
    assert [(m.step, m.value) for m in kl] == [(1, pytest.approx(0.01))]
    assert tracker.nonfinite_counts == {"policy/kl": 1}
    assert tracker.history["reward/mean"] == [(0, 0.5), (1, 0.75)]


def test_resumed_run_logs_each_step_once(tmp_path, shared_uri):
    first = Tracker(tmp_path, experiment="resume", tracking_uri=shared_uri)
    first.log_params({"lr": "1e-3"})
    for step in range(5):
        first.log_metrics(step, {"reward/mean": float(step), "loss": 10.0 - step})
    first.finish("FAILED")  # the job died after step 4; its last checkpoint was at step 2

    resumed = Tracker(tmp_path, tracking_uri=shared_uri, resume_run_id=first.run_id)
    assert resumed.client.get_run(first.run_id).info.status == "RUNNING"
    assert resumed.last_logged_step == 4
    assert resumed.history["loss"] == [(s, 10.0 - s) for s in range(5)]
    resumed.log_params({"lr": "1e-3", "seed": "7"})  # same value again: no MLflow error
    resumed.log_params({"lr": "5e-4"})  # params are immutable: warned and kept, not a crash
    logged = [resumed.log_metrics(step, {"reward/mean": 100.0 + step, "loss": 0.0}) for step in range(3, 8)]
    assert logged == [False, False, True, True, True]
    resumed.finish()

    history = resumed.client.get_metric_history(first.run_id, "reward/mean")
    steps = sorted(m.step for m in history)
    assert steps == list(range(8))  # each step exactly once
    by_step = {m.step: m.value for m in history}
    assert by_step[4] == 4.0 and by_step[5] == 105.0  # the first attempt's value is the one kept
    assert resumed.client.get_run(first.run_id).data.params["lr"] == "1e-3"
    assert resumed.client.get_run(first.run_id).info.status == "FINISHED"


def test_parent_and_child_runs_are_linked(tmp_path, shared_uri):
    with Tracker(tmp_path, experiment="nested", run_name="sweep", tracking_uri=shared_uri) as parent:
        children = [Tracker(tmp_path / f"trial{i}", experiment="nested", tracking_uri=shared_uri,
                            parent_run_id=parent.run_id) for i in range(2)]
        for child in children:
            child.log_metrics(0, {"eval/accuracy": 0.5})
            child.finish()
    client = parent.client
    for child in children:
        assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    found = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert {r.info.run_id for r in found} == {c.run_id for c in children}
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_context_manager_marks_failed(tmp_path, shared_uri):
    with pytest.raises(RuntimeError):
        with Tracker(tmp_path, experiment="failing", tracking_uri=shared_uri) as tracker:
            raise RuntimeError("boom")
    assert tracker.client.get_run(tracker.run_id).info.status == "FAILED"


def test_artifacts_land_in_run_dir_not_cwd(tmp_path, monkeypatch, shared_uri):
    import pyarrow as pa
    import pyarrow.parquet as pq

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_dir = tmp_path / "run"
    note = tmp_path / "note.txt"
    note.write_text("hello")

    # The store lives elsewhere (a new sqlite store costs ~6 s of table creation, so the module shares
    # one); the new experiment puts its artifacts beside that store, never under ./mlruns of the cwd.
    with Tracker(run_dir, experiment="artifacts", tracking_uri=shared_uri) as tracker:
        tracker.log_artifact(note, "notes")
        tracker.log_dict_as_yaml({"b": [1, 2]}, "config.yaml")
        rows = [{"prompt": "1+2=", "completion": "3", "reward": 1.0},
                {"prompt": "2+2=", "completion": "5", "reward": 0.0}]
        tracker.log_table(rows, "step_000003")
        tracker.log_table(pa.table({"x": [1, 2, 3]}), "arrow.parquet")

    assert list(elsewhere.iterdir()) == []  # no ./mlruns, nothing else
    store_dir = Path(shared_uri[len("sqlite:///"):]).parent
    artifact_root = store_dir / "mlartifacts" / tracker.run_id / "artifacts"
    assert (artifact_root / "notes" / "note.txt").read_text() == "hello"
    assert (artifact_root / "config.yaml").is_file()
    listed = {f.path for f in tracker.client.list_artifacts(tracker.run_id, "samples")}
    assert listed == {"samples/step_000003.parquet", "samples/arrow.parquet"}
    local = tracker.client.download_artifacts(tracker.run_id, "samples/step_000003.parquet", str(tmp_path))
    assert pq.read_table(local).to_pylist() == rows


def test_console_log_line():
    console = ConsoleLog(total_steps=200)
    metrics = {"reward/mean": 0.41, "reward/std": 0.49, "eval/accuracy": 0.572, "policy/kl": 0.003,
               "policy/clip_frac": 0.02, "time/step_s": 1.9, "time/generate_s": 0.8, "time/score_s": 0.1,
               "time/reference_s": 0.1, "time/update_s": 0.8, "time/sync_s": 0.05,
               "throughput/tokens_per_s": 2300.0}
    line = console.format(12, metrics)
    assert line == ("step  12/200 | reward 0.41±0.49 | eval 57.2% | kl 0.003 | clip 0.02 | 1.9 s/step "
                    "(gen 0.8 score 0.1 ref 0.1 upd 0.8 sync 0.05) | 2,300 tok/s | eta 5m57s")
    # Missing keys are left out; with a time budget the eta is the sooner of the two.
    budgeted = ConsoleLog(total_steps=200, time_budget_s=60)
    short = budgeted.format(3, {"reward/mean": 0.1, "time/step_s": 2.0}, now=budgeted._start_time + 10)
    assert short == "step   3/200 | reward 0.10 | 2 s/step | eta 50s"
    assert ConsoleLog().format(5, {}) == "step 5"
    assert format_duration(4 * 3600 + 130) == "4h02m"


def test_console_log_prints_one_flushed_line(capsys):
    console = ConsoleLog(total_steps=10)
    console.log(1, {"reward/mean": 0.5})
    console.log(2, {"reward/mean": 0.6})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("step  2/10 | reward 0.60 | eta ")


# -- checkpoints -------------------------------------------------------------------------------------

class TiedLM(torch.nn.Module):
    """Embedding and output head share one weight, like most LMs: safetensors refuses shared storage."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.mlp(self.embed(tokens)))


def _train_step(model, optimizer, tokens):
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_checkpoint_round_trip_continues_identically(tmp_path):
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (4, 6))
    model = TiedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        _train_step(model, optimizer, tokens)
    path = save_checkpoint(tmp_path, 3, models={"policy": model.state_dict()},
                           optimizers={"policy": optimizer.state_dict()},
                           extra={"policy_version": 3, "run_id": "abc", "sampler": {"epoch": 1, "pos": 40}})
    assert Path(path).name == "step_000003"

    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert loaded.step == 3 and loaded.rng is None
    assert loaded.extra == {"policy_version": 3, "run_id": "abc", "sampler": {"epoch": 1, "pos": 40}}
    restored = TiedLM()
    restored.load_state_dict(loaded.models["policy"])
    restored_opt = torch.optim.AdamW(restored.parameters(), lr=1.0)
    restored_opt.load_state_dict(loaded.optimizers["policy"])
    assert restored_opt.param_groups[0]["betas"] == (0.8, 0.95) and restored_opt.param_groups[0]["lr"] == 1e-2

    _train_step(model, optimizer, tokens)
    _train_step(restored, restored_opt, tokens)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name
    assert restored.head.weight is restored.embed.weight  # loading kept the tie


def test_rng_restore_reproduces_draws(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    torch.rand(3), random.random(), np.random.normal()  # numpy caches a gaussian: state beyond the key
    save_checkpoint(tmp_path, 1, models={}, optimizers={}, rng=capture_rng_state())
    expected = (torch.rand(5), [random.random() for _ in range(3)], np.random.normal(size=3))
    torch.rand(100), random.random(), np.random.normal()  # move every generator on

    restore_rng(load_checkpoint(latest_checkpoint(tmp_path)).rng)
    assert torch.equal(torch.rand(5), expected[0])
    assert [random.random() for _ in range(3)] == expected[1]
    assert np.array_equal(np.random.normal(size=3), expected[2])


def test_keep_last_prunes_older_and_resave_replaces(tmp_path):
    weights = {"w": torch.zeros(2)}
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, models={"m": weights}, optimizers={}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004", "step_000005"]
    save_checkpoint(tmp_path, 5, models={"m": {"w": torch.ones(2)}}, optimizers={}, keep_last=2)
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path)).models["m"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004", "step_000005"]


def test_crash_mid_save_leaves_no_visible_checkpoint(tmp_path, monkeypatch):
    assert latest_checkpoint(tmp_path / "missing") is None
    save_checkpoint(tmp_path, 2, models={"m": {"w": torch.zeros(2)}}, optimizers={})
    # A crash that left a temp dir with a complete-looking checkpoint, and a step dir without meta.json.
    leftover = tmp_path / ".tmp_step_crashed"
    leftover.mkdir()
    (leftover / "meta.json").write_text(json.dumps({"step": 9}))
    (tmp_path / "step_000008").mkdir()
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_000002")

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, models={"m": {"w": torch.ones(2)}}, optimizers={})
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_000002")
    monkeypatch.undo()
    save_checkpoint(tmp_path, 4, models={"m": {"w": torch.ones(2)}}, optimizers={})
    assert not leftover.exists()  # the next successful save clears crash leftovers


def test_save_rejects_bad_names_and_pickle_only_state(tmp_path):
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 1, models={"../evil": {}}, optimizers={})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, models={"m": {"w": object()}}, optimizers={})
    assert latest_checkpoint(tmp_path) is None and os.listdir(tmp_path) == []


def test_save_hf_model_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    out = save_hf_model(model, None, tmp_path / "final_policy")
    assert any(name.endswith(".safetensors") for name in os.listdir(out))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


# -- plots -------------------------------------------------------------------------------------------

def test_plots_write_pngs(tmp_path):
    steps = range(0, 60)
    history = {
        "reward/mean": [(s, 0.2 + 0.6 * (1 - np.exp(-s / 20))) for s in steps],
        "reward/std": [(s, 0.45 - 0.2 * s / 60) for s in steps],
        "eval/accuracy": [(s, 0.54 + 0.27 * (1 - np.exp(-s / 15))) for s in steps[::10]],
    }
    curves = plot_training_curves(history, tmp_path / "curves.png", title="GRPO on 3-digit addition",
                                  baselines={"warm start plateau": 0.54, "SFT +10 min": 0.79})
    compare = plot_comparison({"rlpipe": [(s * 2.0, 0.5 + s / 100) for s in range(30)],
                               "TRL": [(s * 2.5, 0.5 + s / 120) for s in range(30)]},
                              tmp_path / "compare.png", "wall time (s)", "eval accuracy", "rlpipe vs TRL")
    empty = plot_training_curves({}, tmp_path / "sub" / "empty.png")
    for path in (curves, compare, empty):
        data = Path(path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_markdown_table_by_hand():
    assert markdown_table(["seed", "score"], [[0, "0.5"], [1, 0.75]]) == \
        "| seed | score |\n|---|---|\n| 0 | 0.5 |\n| 1 | 0.75 |"
