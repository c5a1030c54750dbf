"""Input a user gets wrong, through the real `rlpipe` command: one line naming the thing and the fix, exit 2,
nothing written, all before Ray starts (issue 25, part 6); settings that run but not as the user may think
print one warning line and go on.

`init_ray` is replaced by a stop in these tests: a bad input must be refused before it, and one that is
merely unusual is shown to get there, without the cost of a cluster.
"""
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.cli import main


class ReachedRay(Exception):
    """The run got past every check to where Ray would start."""


@pytest.fixture
def no_ray(monkeypatch):
    def stop(*args, **kwargs):
        raise ReachedRay

    monkeypatch.setattr("actors.run.init_ray", stop)


def train_args(task, out, *extra):
    return ["train", "--config", "grpo", f"model.path={task['model']}", f"data.train_path={task['data']['train']}",
            f"data.eval_path={task['data']['eval']}", "data.eval_size=20", f"train.output_dir={out}",
            "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6", *extra]


def files_under(folder) -> set[str]:
    return {os.path.relpath(os.path.join(root, name), folder)
            for root, dirs, names in os.walk(folder) for name in names + dirs}


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rlpipe {command}: error: "), err
    return err[0]


def refused(capsys, tmp_path, argv: list[str]) -> str:
    """Run `rlpipe argv` in tmp_path; assert exit 2, one error line, nothing written. -> the line."""
    before = files_under(tmp_path)
    assert main(argv) == 2
    assert files_under(tmp_path) == before       # no run folder, no MLflow store
    return one_error_line(capsys, argv[0])


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)             # a default ./mlruns or runs/ would land here


# ----------------------------------------------------------------------------- 1. LoRA target modules

@pytest.mark.unit
def test_a_lora_target_module_the_model_lacks_is_refused_naming_its_layers(tiny_task, tmp_path, capsys, no_ray):
    line = refused(capsys, tmp_path, train_args(tiny_task, tmp_path / "run", "lora.rank=4",
                                                "lora.target_modules=[q_proj,qkv]"))
    assert "lora.target_modules=['q_proj', 'qkv']: qkv is not a module of model.path" in line
    assert "q_proj, up_proj, v_proj; or use [all-linear]" in line
    with pytest.raises(ReachedRay):           # names the model has pass
        main(train_args(tiny_task, tmp_path / "run", "lora.rank=4", "lora.target_modules=[q_proj,v_proj]"))


# ----------------------------------------------------------------------------- 2. vLLM missing

@pytest.mark.unit
def test_rollout_backend_vllm_without_vllm_is_refused_before_ray(tiny_task, tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.setitem(sys.modules, "vllm", None)     # `import vllm` raises ImportError, as when not installed
    line = refused(capsys, tmp_path, train_args(tiny_task, tmp_path / "run", "rollout.backend=vllm"))
    assert "rollout.backend=vllm needs vLLM, which did not import" in line
    assert "pip install -e '.[vllm]'" in line and "or use rollout.backend=hf" in line


# ----------------------------------------------------------------------------- 3. shard on one learner

@pytest.mark.unit
def test_shard_on_one_learner_warns_once_and_runs(tiny_task, tmp_path, capsys, no_ray):
    with pytest.raises(ReachedRay):           # not refused: a sharded run resumes on one learner
        main(train_args(tiny_task, tmp_path / "run", "learner.parallel=shard", "resources.learners=1"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "learner.parallel=shard" in line]
    assert warnings == ["warning: learner.parallel=shard with resources.learners=1 does not shard: sharding starts "
                        "at 2 learners, and one learner holds the whole model (set resources.learners=2 or more "
                        "to shard)"]
    with pytest.raises(ReachedRay):           # two learners shard: no warning
        main(train_args(tiny_task, tmp_path / "run2", "learner.parallel=shard", "resources.learners=2"))
    assert "learner.parallel=shard" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- 4. resuming another command's folder

@pytest.fixture(scope="module")
def sft_folder(tiny_task, tmp_path_factory):
    """A real `rlpipe sft` run folder (one optimizer step)."""
    out = tmp_path_factory.mktemp("made_by_sft") / "sft"
    assert main(["sft", "--model", tiny_task["model"], "--data", tiny_task["data"]["labelled"], "--out", str(out),
                 "--max-steps", "1", "--eval-size", "5"]) == 0
    return out


@pytest.mark.unit
def test_resuming_a_folder_of_another_command_names_the_command_that_resumes_it(sft_folder, tmp_path, capsys,
                                                                               no_ray):
    before = {p: os.path.getmtime(sft_folder / p) for p in files_under(sft_folder)}
    line = refused(capsys, tmp_path, ["train", "--resume", str(sft_folder)])
    assert line == (f"rlpipe train: error: {sft_folder} is a run folder of `rlpipe sft`, not of `rlpipe train`; "
                    f"resume it with `rlpipe sft --resume {sft_folder}`")
    line = refused(capsys, tmp_path, ["reward-model", "--resume", str(sft_folder)])
    assert f"is a run folder of `rlpipe sft`, not of `rlpipe reward-model`; resume it with `rlpipe sft" in line
    assert {p: os.path.getmtime(sft_folder / p) for p in files_under(sft_folder)} == before
    line = refused(capsys, tmp_path, ["train", "--resume", str(tmp_path / "nothing")])
    assert "holds no rlpipe train run (no config.yaml)" in line


# ----------------------------------------------------------------------------- 5. empty prompts

@pytest.mark.unit
def test_empty_prompts_are_dropped_with_a_count_and_all_empty_is_refused(tiny_task, tmp_path, capsys, no_ray):
    from pipeline.config import load_config
    from pipeline.runs.preflight import preflight

    prompts = ["1+2=", "", "   ", "3+4=", "", ""]
    pq.write_table(pa.table({"prompt": prompts, "answer": ["3", "", "", "7", "", ""]}), tmp_path / "some.parquet")
    args = train_args(tiny_task, tmp_path / "run", f"data.train_path={tmp_path}/some.parquet")
    with pytest.raises(ReachedRay):
        main(args)
    assert (f"data.train_path {tmp_path}/some.parquet: dropped 4 of 6 prompts that are empty"
            in capsys.readouterr().out.splitlines())
    train, _, _ = preflight(load_config(args[2], args[3:]), log=lambda _: None)
    assert train.column("prompt").to_pylist() == ["1+2=", "3+4="]

    pq.write_table(pa.table({"prompt": ["", " "], "answer": ["3", "4"]}), tmp_path / "none.parquet")
    none = tmp_path / "none.parquet"
    line = refused(capsys, tmp_path, train_args(tiny_task, tmp_path / "run", f"data.train_path={none}"))
    assert line.endswith(f"data.train_path {none}: every prompt of column 'prompt' is empty (2 rows); fill the "
                         "prompts in, or point data.prompt_column at the column that holds them")


# ----------------------------------------------------------------------------- 6. supervised hold-out

@pytest.fixture
def stop_before_training(monkeypatch):
    """Replace the training step of the supervised runs; -> the list their one-line summaries land in."""
    seen = []

    def stop(cfg, build, settings_name, what, **kwargs):
        seen.append(what)
        raise ReachedRay

    monkeypatch.setattr("pipeline.runs.supervised.train_in_run_folder", stop)
    return seen


@pytest.mark.unit
def test_sft_on_a_small_file_holds_out_a_tenth_and_an_explicit_count_is_kept(tiny_task, tmp_path, capsys,
                                                                            stop_before_training):
    rows = pq.read_table(tiny_task["data"]["labelled"]).slice(0, 100)
    pq.write_table(rows, tmp_path / "small.parquet")
    sft = ["sft", "--model", tiny_task["model"], "--data", str(tmp_path / "small.parquet"),
           "--out", str(tmp_path / "o")]
    with pytest.raises(ReachedRay):
        main(sft)
    with pytest.raises(ReachedRay):
        main([*sft, "--eval-size", "30"])
    assert stop_before_training == ["sft: 90 training rows, 10 held out", "sft: 70 training rows, 30 held out"]
    line = refused(capsys, tmp_path, [*sft, "--eval-size", "200"])
    assert "cannot hold out 200 of 100 rows for evaluation; give --eval-data, or a --eval-size between 1" in line


@pytest.mark.unit
def test_reward_model_on_a_small_file_holds_out_a_tenth(tiny_task, tmp_path, stop_before_training):
    pq.write_table(pa.table({"prompt": [f"{i}+1=" for i in range(100)], "chosen": [str(i + 1) for i in range(100)],
                             "rejected": [str(i) for i in range(100)]}), tmp_path / "pairs.parquet")
    with pytest.raises(ReachedRay):
        main(["reward-model", "--model", tiny_task["model"], "--data", str(tmp_path / "pairs.parquet"),
              "--out", str(tmp_path / "o")])
    assert stop_before_training[0].startswith("reward model: 90 training pairs, 10 held out")


@pytest.mark.unit
def test_one_set_of_run_folder_rules_for_every_command(tmp_path):
    """`rlpipe train` and the supervised commands claim their folders by the same rules: a folder holding any
    command's run is refused unless replaced (--overwrite) or continued (--resume, only by its own command)."""
    from pipeline.runs.folder import RunFolderError, claim_run_folder

    fresh = claim_run_folder(tmp_path / "new", "sft.yaml", resume=False, overwrite=False, where="--out")
    assert fresh.is_dir() and not any(fresh.iterdir())
    (fresh / "sft.yaml").write_text("model: m\n")
    (fresh / "checkpoints").mkdir()
    for settings, where in (("sft.yaml", "--out"), ("config.yaml", "train.output_dir")):
        with pytest.raises(RunFolderError, match=f"{where} '{fresh}' already holds a run; pass --resume"):
            claim_run_folder(fresh, settings, resume=False, overwrite=False, where=where)
    with pytest.raises(RunFolderError, match="is a run folder of `rlpipe sft`, not of `rlpipe train`"):
        claim_run_folder(fresh, "config.yaml", resume=True, overwrite=False, where="train.output_dir")
    assert claim_run_folder(fresh, "sft.yaml", resume=True, overwrite=False, where="--out") == fresh
    assert (fresh / "checkpoints").is_dir()                          # resuming keeps what is there
    claim_run_folder(fresh, "config.yaml", resume=False, overwrite=True, where="train.output_dir")
    assert not any(fresh.iterdir())                                   # replaced
    with pytest.raises(RunFolderError, match="holds no rlpipe reward-model run"):
        claim_run_folder(fresh, "reward_model.yaml", resume=True, overwrite=False, where="--out")
