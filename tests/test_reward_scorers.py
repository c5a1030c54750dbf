"""Learned reward models in the RL loop: scorers load each model once, score every sample exactly once (also
when one dies mid-step), mix with rule functions in one weighted score; normalisation and clipping; the critic
initialised from a reward model; a path that is not a reward model is refused before anything is written."""

import pytest
import ray
import torch

from actors.cli import main
from actors.driver import Trainer
from actors.pools import start_actors
from pipeline.config import ConfigError, load_config
from pipeline.data.prompt_table import read_prompt_table
from pipeline.rewards.functions import RewardComposer, RunningMoments, reward_model_names, shape_scores


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_task, tmp_path_factory):
    """A one-label sequence classifier on the tiny task's char Llama (a random score head): a real reward-model
    folder as `rlpipe reward-model` writes them."""
    from pipeline.checkpoint import save_hf_model
    from pipeline.models import load_tokenizer
    from pipeline.rewards.models import build_reward_model

    tokenizer = load_tokenizer(tiny_task["model"])
    torch.manual_seed(0)
    model = build_reward_model(tiny_task["model"], tokenizer)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    return save_hf_model(model, tokenizer, tmp_path_factory.mktemp("rm") / "sevens_rm" / "model")


@pytest.mark.unit
def test_running_moments_and_shaping_by_hand():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0, 5.0]))
    assert moments.count == 5 and moments.mean == pytest.approx(3.0) and moments.std == pytest.approx(2.5 ** 0.5)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict()
    fresh = RunningMoments()          # whitened with the moments of [0, 10, failed]: mean 5, std 7.071
    shaped = shape_scores(torch.tensor([0.0, 10.0, 99.0]), torch.tensor([False, False, True]), fresh, clip=1.0)
    assert shaped.tolist() == pytest.approx([-5 / 50 ** 0.5, 5 / 50 ** 0.5, 1.0])
    assert shape_scores(torch.tensor([-7.0, 3.0]), torch.tensor([False, False]), None, clip=5.0).tolist() == [-5.0, 3.0]


@pytest.mark.unit
def test_reward_model_names_are_the_run_folders_and_unique():
    assert reward_model_names([{"path": "runs/helpful/model"}, {"path": "/x/harmless"},
                               {"path": "other/helpful/model"}, {"path": "y", "name": "mine"}]) == \
        ["rm/helpful", "rm/harmless", "rm/helpful_2", "rm/mine"]


@pytest.mark.unit
@pytest.mark.parametrize("entry, fragment", [
    ("[runs/rm]", "reward.models[0]: 'runs/rm' is not a mapping with a path"),
    ("[{path: a, weigth: 1}]", "reward.models[0].weigth: unknown key; valid: path, weight, batch_size, dtype, name"),
    ("[{path: a, batch_size: 0}]", "reward.models[0].batch_size: 0 must be >= 1"),
])
def test_bad_reward_model_entries_are_config_errors(entry, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"reward.models={entry}"])
    assert fragment in str(err.value)


@pytest.mark.unit
def test_a_path_that_is_not_a_reward_model_is_one_error_before_anything_is_written(tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", f"model.path={tiny_task['model']}", f"data.train_path={tiny_task['data']['train']}",
                 f"data.eval_path={tiny_task['data']['eval']}", f"train.output_dir={out}",
                 f"reward.models=[{{path: {tiny_task['model']}}}]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "reward.models[0].path" in err and "is a LlamaForCausalLM with" in err and "rlpipe reward-model" in err
    assert not out.exists()


@pytest.mark.unit
def test_composer_mixes_a_reward_model_with_rule_functions(tiny_task, tiny_reward_model):
    from pipeline.rewards.models import RewardModelFunction

    composer = RewardComposer(["exact_match"], [2.0], models=[{"path": tiny_reward_model, "weight": 0.5,
                                                              "batch_size": 3}])
    prompts, completions, answers = ["12+30=", "40+2=", "1+1=", "9+9="], ["42", "42", "3", "18"], ["42", "42", "2", "18"]
    shard = composer.score(prompts, completions, {"answer": answers})
    rm = RewardModelFunction(tiny_reward_model)(prompts, completions)
    assert shard.scores == pytest.approx([2.0 * float(c == a) + 0.5 * r for c, a, r in zip(completions, answers, rm)])
    assert shard.per_function["rm/sevens_rm"] == pytest.approx(rm) and len(set(rm)) == 4


@pytest.mark.unit
def test_critic_starts_as_the_reward_model(tiny_reward_model):
    from transformers import AutoModelForSequenceClassification

    from pipeline.models import ValueModel, left_padded_positions

    critic = ValueModel(tiny_reward_model)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model)
    assert torch.equal(critic.value_head.weight, rm.score.weight)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    values = critic(ids, mask, left_padded_positions(mask))
    assert values[0, -1].item() == pytest.approx(rm(input_ids=ids, attention_mask=mask).logits[0, 0].item(), abs=1e-5)


@pytest.mark.ray
def test_two_reward_model_scorers_load_once_score_each_sample_once_and_survive_a_death(
        tiny_task, tiny_reward_model, tmp_path, ray_with_marker):
    from pipeline.rewards.models import RewardModelFunction

    cfg = load_config(None, [
        f"model.path={tiny_task['model']}", f"data.train_path={tiny_task['data']['train']}", "data.eval_path=null",
        "rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6",
        "resources.reward_scorers=2", "resources.cpus_per_rollout_worker=0.5",
        "resources.cpus_per_reward_scorer=0.5", "resources.cpus_per_learner=0.5", "resources.torch_threads=1",
        "reward.functions=[tests.rewards_for_tests:dies_once]", "reward.weights=[3.0]",
        f"reward.models=[{{path: {tiny_reward_model}, weight: 0.5, batch_size: 5}}]", "reward.normalize=true",
        f"train.output_dir={tmp_path}/run"])
    pools = start_actors(cfg)
    try:
        pools.wait_ready()
        trainer = Trainer(cfg, pools, read_prompt_table(cfg.data.train_path), None, tracker=None, console=None)
        metrics = trainer.step()                                     # scorer 0 dies here, once, by os._exit
        assert ray_with_marker.exists() and trainer.resent_shards >= 1
        assert ray.get([s.reward_models_loaded.remote() for s in pools.scorers]) == [1, 1]
        rollout = trainer.last_batch.rollout
        rm = RewardModelFunction(tiny_reward_model)(rollout.prompts, rollout.completions)
        raw = torch.tensor([3.0 * c.count("7") / max(len(c), 1) + 0.5 * r for c, r in zip(rollout.completions, rm)])
        assert metrics["reward/mean"] == pytest.approx(raw.mean().item(), abs=1e-5)      # each sample once
        assert metrics["reward/fn/rm/sevens_rm"] == pytest.approx(sum(rm) / len(rm), abs=1e-5)
        assert trainer.last_batch.scores.tolist() == pytest.approx(((raw - raw.mean()) / raw.std()).tolist(), abs=1e-4)
        trainer.step()
        assert ray.get([s.reward_models_loaded.remote() for s in pools.scorers]) == [1, 1]   # not per call
        assert trainer.reward_moments.count == 64
    finally:
        pools.shutdown()


@pytest.mark.unit
def test_critic_from_a_causal_lm_prints_no_load_report(tiny_task, capfd):
    """The critic's trunk comes from a causal-LM folder whose lm_head it does not use: that is intended, and
    transformers' "lm_head.weight UNEXPECTED" table is not printed."""
    from pipeline.models import ValueModel

    ValueModel(tiny_task["model"])
    captured = capfd.readouterr()
    assert "UNEXPECTED" not in captured.out + captured.err and "lm_head" not in captured.out + captured.err
