"""Config loading, overrides and validation: one clear error per bad input."""
import pytest

from pipeline.config import ConfigError, RunConfig, config_reference_markdown, load_config
from pipeline.tracking import flatten_config

pytestmark = pytest.mark.unit


def test_defaults_and_presets_load():
    assert load_config().algorithm.name == "grpo"
    ppo = load_config("ppo")
    assert ppo.algorithm.name == "gae" and ppo.model.critic == "separate"
    assert load_config("grpo").rollout.samples_per_prompt == 8


def test_dotted_overrides_are_typed():
    cfg = load_config("grpo", ["algorithm.clip_range=0.1", "learner.lr=1e-4", "algorithm.clip_range_high=null",
                               "reward.functions=[exact_match, format_number]", "reward.weights=[1, 0.1]"])
    assert cfg.algorithm.clip_range == 0.1 and cfg.learner.lr == 1e-4
    assert cfg.algorithm.clip_range_high is None
    assert cfg.reward.functions == ["exact_match", "format_number"] and cfg.reward.weights == [1, 0.1]


@pytest.mark.parametrize("override, fragment", [
    (["algorithm.clip_rnage=0.1"], "unknown config field algorithm.clip_rnage"),
    (["algorithmm.name=grpo"], "unknown config field algorithmm"),
    (["learner.lr=fast"], "learner.lr: expected a number, got 'fast'"),
    (["rollout.samples_per_prompt=2.5"], "rollout.samples_per_prompt: expected an integer"),
    (["rollout.top_p=1.5"], "rollout.top_p: 1.5 is out of range; allowed [0.0, 1.0]"),
    (["algorithm.kl_estimator=k4"], "algorithm.kl_estimator: 'k4' is not one of k1, k2, k3"),
    (["algorithm.name=dpo"], "algorithm.name: 'dpo' is not an estimator; valid:"),
    (["algorithm.kl_in_reward=yes please"], "algorithm.kl_in_reward: expected true or false"),
    (["reward.weights=[1, 2]"], "reward.weights: 2 weights for 1 functions"),
    (["rollout.samples_per_prompt=1"], "rollout.samples_per_prompt: grpo compares samples within a group"),
    (["learner.lr"], "expected section.field=value"),
    (["algorithm.tis_cap=2.0", "algorithm.old_logprobs=sampler"], "algorithm.tis_cap: importance weights"),
    (["vllm.kv_cache_gib=0"], "vllm.kv_cache_gib: 0 is out of range"),
    (["rollout.backend=vllm", "rollout.top_k=5", "rollout.temperature=0.7"], "rollout.temperature: vLLM reports"),
    (["rollout.backend=vllm", "rollout.top_p=0.9", "rollout.temperature=1.2"], "neither is the policy"),
    (["lora.rank=4", "lora.dropout=0.05"], "lora.dropout: 0.05 would draw new masks"),
])
def test_bad_values_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("grpo", override)
    assert fragment in str(err.value)


def test_an_unknown_backend_is_refused_where_the_backends_register():
    from pipeline.rollout import check_backend

    with pytest.raises(ConfigError, match="rollout.backend: 'sglang' is not a generation backend; valid: hf, vllm"):
        check_backend(load_config("grpo", ["rollout.backend=sglang"]).rollout.backend)


def test_what_vllm_can_report_consistently_is_accepted():
    for override in (["rollout.top_k=5"], ["rollout.top_p=0.9", "rollout.top_k=20"], ["rollout.temperature=0.7"]):
        assert load_config("grpo", ["rollout.backend=vllm", *override]).rollout.backend == "vllm"


def test_bad_file_and_preset(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a preset; presets: grpo, ppo"):
        load_config("nonexistent")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  max_new_tokens: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("learner: 3\n")
    with pytest.raises(ConfigError, match="learner: expected a mapping"):
        load_config(str(bad))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("ppo", ["learner.lr=3e-4"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg
    assert flatten_config(cfg.to_dict())["learner.lr"] == "0.0003"


def test_every_field_documented_once():
    doc = config_reference_markdown()
    for key in flatten_config(RunConfig().to_dict()):
        assert doc.count(f"| `{key}` |") == 1, key


def test_docs_reference_is_the_generated_one():
    import os

    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md")).read()
    assert config_reference_markdown() in page, "docs/configuration.md is stale: paste `rlpipe config --doc` into it"


def test_where_pi_old_comes_from_is_one_decision():
    from pipeline.config import pi_old_source

    one_step = ["learner.epochs=1", "learner.minibatch_size=64"]
    assert pi_old_source(load_config("grpo", ["model.dtype=float32", "algorithm.old_logprobs=auto"]), 64) == "sampler"
    assert pi_old_source(load_config("grpo", ["algorithm.old_logprobs=sampler", *one_step]), 64) == "sampler"
    learner = load_config("grpo", ["algorithm.old_logprobs=learner", *one_step])
    assert pi_old_source(learner, 64) == "update"                 # one optimizer step: its own forward
    assert pi_old_source(learner, 65) == "learner"                # two minibatches: a pass before the update
    kl = load_config("grpo", ["algorithm.old_logprobs=learner", "algorithm.kl_in_reward=true",
                              "algorithm.kl_coef=0.1", "algorithm.kl_estimator=k1", *one_step])
    assert pi_old_source(kl, 64) == "learner"                     # the KL in the reward needs pi_old first
