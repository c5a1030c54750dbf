"""FSDP2-sharded learners (learner.parallel=shard): K ranks holding 1/K of the model each take the step one
unsharded learner takes, answer the same rollout forwards and export the same weights; checkpoints resume on
a different number of learners."""
from __future__ import annotations

import copy
import os

import pytest
import ray
import torch

from tests.test_collective import _initial_policy_state, _scored_batch


def _cfg(tiny_task, tmp_path, preset, k, *extra):
    from pipeline.config import load_config

    return load_config(preset, [
        f"model.path={tiny_task['model']}", f"data.train_path={tiny_task['data']['train']}",
        "rollout.prompts_per_step=6", "rollout.samples_per_prompt=3", "rollout.max_new_tokens=4",
        "learner.minibatch_size=8", "learner.epochs=2", "learner.lr=1e-2", "learner.critic_lr=1e-2",
        "learner.max_grad_norm=0.5", "learner.warmup_steps=0", "algorithm.kl_coef=0", f"resources.learners={k}",
        "learner.parallel=shard", f"train.output_dir={tmp_path}", *extra])


@pytest.mark.ray
@pytest.mark.parametrize("preset,k,updates,extra", [
    ("grpo", 2, 3, ["algorithm.loss_agg=token-mean"]),                      # 3 updates of 2 epochs x 3 minibatches
    ("ppo", 2, 3, ["algorithm.loss_agg=seq-mean-token-mean"]),              # separate critic, sharded too
    # 18 sequences in minibatches of 8, 8, 2 over 3 ranks, 2 rows per pass: ranks run padding passes. One
    # update (3 optimizer steps) at lr 1e-3: at 1e-2 AdamW magnifies the float order of the sums on
    # near-zero gradients past 1e-5, for 3 replicated learners as for sharded ones.
    ("grpo", 3, 1, ["learner.micro_batch_tokens=20", "model.critic=shared", "algorithm.name=gae",
                    "learner.epochs=1", "learner.lr=1e-3"]),
])
def test_k_sharded_learners_update_exactly_like_one(tiny_task, ray_local, tmp_path, preset, k, updates, extra):
    from actors.learner_group import LearnerGroup
    from actors.pools import connect_group
    from actors.shells import Learner
    from pipeline.collective import DP_GROUP
    from pipeline.weights import state_checksum

    cfg = _cfg(tiny_task, tmp_path, preset, k, *extra)
    single, batch = _scored_batch(cfg)
    learners = [Learner.options(num_cpus=0.5).remote(cfg, 1, rank, k) for rank in range(k)]
    group = LearnerGroup(learners, sharded=True)
    try:
        connect_group(DP_GROUP, learners, "gloo", timeout_s=60)
        held = ray.get(learners[0].held_parameters.remote())
        forward = ray.get(group.submit_rollout_forward(batch.rollout, True))
        want_forward = single.rollout_forward(batch.rollout, True)
        for version in range(updates):
            batch.rollout.policy_version = version            # the same batch, as if sampled afresh
            got = group.update(batch)
            want = single.update(batch)
        models, _ = group.state()
        checksums = group.checksums()
        files = group.hf_files()
    finally:
        for learner in learners:
            ray.kill(learner)
    assert held["policy"][0] < 0.6 * held["policy"][1]                # each rank holds about 1/K of it
    for key in ("values", "old_logprobs"):
        if want_forward[key] is not None:
            torch.testing.assert_close(forward[key], want_forward[key], rtol=1e-5, atol=1e-6, msg=key)
    for key in ("policy/loss", "policy/entropy", "optim/grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    reference, _ = single.state()
    assert set(models) == set(reference)
    for section, params in reference.items():
        assert set(models[section]) == set(params), section
        for name, value in params.items():
            torch.testing.assert_close(models[section][name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    initial = _initial_policy_state(cfg)
    assert max((reference["policy"][n] - initial[n]).abs().max().item() for n in initial) > 1e-3
    assert checksums == [state_checksum(models["policy"])]           # one policy, gathered on rank 0
    assert "model.safetensors" in files


@pytest.mark.ray
def test_sharded_learners_hold_the_reference_and_offload_to_cpu(tiny_task, ray_local, tmp_path):
    """kl_coef > 0 on sharded learners: no reference actor; the learners hold the frozen reference sharded
    between them, answer the reference actor's log-probs and take the unsharded step with the KL term, with
    their shards in host memory (learner.cpu_offload; on a CPU the same memory, the same code path)."""
    from actors.learner_group import LearnerGroup
    from actors.pools import connect_group
    from actors.shells import Learner
    from pipeline.collective import DP_GROUP
    from pipeline.config import learner_reference
    from pipeline.rollout.reference import ReferencePolicy

    cfg = _cfg(tiny_task, tmp_path, "grpo", 2, "algorithm.kl_coef=0.1", "learner.cpu_offload=true")
    assert learner_reference(cfg)                                   # so the pools start no reference actor
    single, batch = _scored_batch(cfg)
    want_ref = ReferencePolicy(cfg.model, cfg.rollout.temperature).logprobs(batch.rollout)
    learners = [Learner.options(num_cpus=0.5).remote(cfg, 1, rank, 2) for rank in range(2)]
    group = LearnerGroup(learners, sharded=True)
    try:
        connect_group(DP_GROUP, learners, "gloo", timeout_s=60)
        held = ray.get(learners[1].held_parameters.remote())
        forward = ray.get(group.submit_rollout_forward(batch.rollout, False, True))
        batch.ref_logprobs = forward["ref_logprobs"]
        got = [group.update(batch) for batch.rollout.policy_version in range(2)]
        models, _ = group.state()
    finally:
        for learner in learners:
            ray.kill(learner)
    assert held["reference"][0] < 0.6 * held["reference"][1]
    torch.testing.assert_close(forward["ref_logprobs"], want_ref, rtol=1e-5, atol=1e-6)
    want = [single.update(batch) for batch.rollout.policy_version in range(2)]
    assert want[-1]["policy/kl"] > 0                                # the KL term took part in the step
    for g, w in zip(got, want):
        for key in ("policy/loss", "policy/kl", "optim/grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), key
    for name, value in single.state()[0]["policy"].items():
        torch.testing.assert_close(models["policy"][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.ray
def test_sharded_checkpoint_resumes_on_another_number_of_learners(tiny_task, ray_local, tmp_path):
    """A checkpoint of K=2 sharded learners loads into K=3 sharded learners and into one unsharded learner,
    and each then takes the same next step."""
    from actors.learner_group import LearnerGroup
    from actors.pools import connect_group
    from actors.shells import Learner
    from pipeline.collective import DP_GROUP
    from pipeline.trainers.ppo import PolicyLearner

    cfg2 = _cfg(tiny_task, tmp_path, "ppo", 2)
    _, batch = _scored_batch(cfg2)

    def start(k):
        cfg = _cfg(tiny_task, tmp_path, "ppo", k)
        learners = [Learner.options(num_cpus=0.5).remote(cfg, 1, rank, k) for rank in range(k)]
        connect_group(DP_GROUP, learners, "gloo", timeout_s=60)
        return learners, LearnerGroup(learners, sharded=True)

    learners, group = start(2)
    try:
        group.update(batch)
        models, optimizers = group.state()
    finally:
        for learner in learners:
            ray.kill(learner)
    batch.rollout.policy_version = 1
    single = PolicyLearner(_cfg(tiny_task, tmp_path, "ppo", 1))
    single.load_state(*copy.deepcopy((models, optimizers)), version=1)   # in one process, loading shares tensors
    want = single.update(batch)
    learners, group = start(3)
    try:
        group.load_state(models, optimizers, version=1)
        got = group.update(batch)
        after, _ = group.state()
    finally:
        for learner in learners:
            ray.kill(learner)
    for key in ("policy/loss", "value/loss", "optim/grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    reference, _ = single.state()
    for section, params in reference.items():
        for name, value in params.items():
            torch.testing.assert_close(after[section][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.unit
def test_sharding_refuses_what_it_cannot_do(tiny_task, tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="model.dtype=bfloat16"):
        _cfg(tiny_task, tmp_path, "grpo", 2, "model.dtype=float16")
    with pytest.raises(ConfigError, match="learner.parallel=replicate"):
        _cfg(tiny_task, tmp_path, "grpo", 2, "lora.rank=4")
    with pytest.raises(ConfigError, match="learner.cpu_offload=false"):
        _cfg(tiny_task, tmp_path, "grpo", 1, "learner.cpu_offload=true")


@pytest.mark.slow
def test_sharded_run_killed_and_resumed_on_one_learner_continues_its_curve(tiny_task, tmp_path):
    """`rlpipe train` on 2 sharded learners (holding the KL's reference between them), crashed after step 3
    (checkpoint at 2), resumed by `rlpipe train --resume` with resources.learners=1 (a reference actor): steps
    1..5 logged once each, and the resumed steps' losses are those of the same run left uninterrupted on 2
    sharded learners. (This is also the synchronous crash-and-resume test: the resumed run is one plain learner;
    the asynchronous one is in test_async.py.)"""
    import mlflow

    from actors.cli import main
    from actors.run import run_training
    from pipeline.config import load_config
    from tests.test_train_e2e import Crash, run_args

    def args(out):          # sevens: a reward the random tiny model earns by chance
        return run_args(tiny_task, out, "train.steps=5", "train.eval_every=5", "checkpoint.every=2",
                        "resources.learners=2", "learner.parallel=shard", "learner.lr=1e-3",
                        "algorithm.kl_coef=0.05", "reward.functions=[tests.rewards_for_tests:sevens]")

    def curve(out, metric="policy/loss"):
        client = mlflow.MlflowClient(f"sqlite:///{out}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("rlpipe").experiment_id])
        return run, {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}

    def crash_at_3(step, metrics, trainer):
        if step == 3:
            raise Crash("simulated failure after the step-2 checkpoint")

    whole = tmp_path / "whole"
    run_training(load_config("grpo", args(whole)))
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        run_training(load_config("grpo", args(out)), on_step=crash_at_3)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000002"]
    assert main(["train", "--resume", str(out), "resources.learners=1"]) == 0
    run, losses = curve(out)
    _, want = curve(whole)
    assert sorted(losses) == [1, 2, 3, 4, 5] and run.info.status == "FINISHED"   # no step logged twice
    assert "step_000005" in os.listdir(out / "checkpoints")
    assert any(abs(v) > 1e-4 for v in want.values())             # the policy did learn something
    for step in range(1, 6):
        assert losses[step] == pytest.approx(want[step], rel=1e-3, abs=1e-5), (step, losses, want)
    _, kls = curve(out, "policy/kl")
    _, want_kls = curve(whole, "policy/kl")
    assert kls[5] > 0 and kls[5] == pytest.approx(want_kls[5], rel=1e-3, abs=1e-7)


@pytest.mark.ray
def test_sharded_bfloat16_gathers_in_bfloat16_and_keeps_float32_masters(tiny_task, ray_local, tmp_path):
    """FSDP2's mixed precision: the blocks are gathered (and the generators fed) in bfloat16, the shards the
    optimizer steps on stay float32, and the update stays close to one unsharded bfloat16 learner's."""
    from actors.learner_group import LearnerGroup
    from actors.pools import connect_group
    from actors.shells import Learner
    from pipeline.collective import DP_GROUP

    cfg = _cfg(tiny_task, tmp_path, "grpo", 2, "model.dtype=bfloat16", "algorithm.old_logprobs=sampler")
    single, batch = _scored_batch(cfg)
    learners = [Learner.options(num_cpus=0.5).remote(cfg, 1, rank, 2) for rank in range(2)]
    group = LearnerGroup(learners, sharded=True)
    try:
        connect_group(DP_GROUP, learners, "gloo", timeout_s=60)
        got = group.update(batch)
        packet = ray.get(group.export_weights())
        models, _ = group.state()
    finally:
        for learner in learners:
            ray.kill(learner)
    want = single.update(batch)
    assert got["policy/loss"] == pytest.approx(want["policy/loss"], abs=2e-2)
    reference, _ = single.state()
    assert all(v.dtype == torch.float32 for v in models["policy"].values())
    initial = _initial_policy_state(cfg)
    names = list(initial)
    step = torch.cat([(reference["policy"][n] - initial[n]).flatten() for n in names])
    sharded_step = torch.cat([(models["policy"][n] - initial[n]).flatten() for n in names])
    # bf16 compute differs in rounding (FSDP2 casts the norms' weights too, autocast does not): the two updates
    # agree in direction and size, not to the last bit (AdamW turns near-zero gradients into full-size steps)
    assert torch.nn.functional.cosine_similarity(step, sharded_step, dim=0) > 0.9
    assert 0.8 < sharded_step.norm() / step.norm() < 1.25
    assert packet.version == 1 and set(packet.dtypes.values()) == {"bfloat16"}


@pytest.mark.ray
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_sharded_bfloat16_ppo_keeps_its_value_heads_float32(tiny_task, ray_local, tmp_path, critic):
    """The `ppo` preset sharded in bfloat16: the value head is gathered in float32 (as `values_from_hidden`
    feeds it), so a separate critic does not fail on the dtype mismatch and a shared one gives float32 values,
    through the rollout forward and two updates."""
    from actors.learner_group import LearnerGroup
    from actors.pools import connect_group
    from actors.shells import Learner
    from pipeline.collective import DP_GROUP

    cfg = _cfg(tiny_task, tmp_path, "ppo", 2, "model.dtype=bfloat16", f"model.critic={critic}")
    _, batch = _scored_batch(cfg)
    learners = [Learner.options(num_cpus=0.5).remote(cfg, 1, rank, 2) for rank in range(2)]
    group = LearnerGroup(learners, sharded=True)
    try:
        connect_group(DP_GROUP, learners, "gloo", timeout_s=60)
        steps = []
        for version in range(2):
            forward = ray.get(group.submit_rollout_forward(batch.rollout, True))
            assert forward["values"].dtype == torch.float32
            batch.values, batch.rollout.policy_version = forward["values"], version
            steps.append(group.update(batch))
        models, _ = group.state()
    finally:
        for learner in learners:
            ray.kill(learner)
    head = models["critic"]["value_head.weight"] if critic == "separate" else models["value_head"]["weight"]
    assert head.dtype == torch.float32 and head.abs().sum() > 0          # trained, in float32
    assert all(torch.isfinite(torch.tensor(s["value/loss"])) for s in steps)
    assert forward["values"].unique().numel() > 1                        # the trained head reads the tokens
