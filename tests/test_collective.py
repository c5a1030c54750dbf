"""Process groups of our own: shard weights, gradient all-reduce, weight broadcast, K learners == 1 learner."""
import os
import signal
import threading

import pytest
import ray
import torch

from pipeline.algorithms.core import aggregate_loss, shard_weight
from pipeline.collective import Group, all_reduce_grads, open_store, receive_weights, send_weights, weights_spec
from pipeline.weights import state_checksum


# ------------------------------------------------------------------------------ pure parts, no Ray

@pytest.mark.unit
def test_shard_weight_by_hand():
    full = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    first, second = full[:2], full[2:]
    assert shard_weight(first, full, "token-mean") == pytest.approx(4 / 6)          # 4 of the 6 valid tokens
    assert shard_weight(second, full, "token-mean") == pytest.approx(2 / 6)
    assert shard_weight(first, full, "seq-mean-token-mean") == pytest.approx(2 / 3)  # 2 of 3 valid sequences
    assert shard_weight(second, full, "seq-mean-token-sum-norm") == pytest.approx(1 / 3)
    assert shard_weight(full[3:], full[3:], "token-mean") == 0.0                      # nothing valid: 0, not NaN
    with pytest.raises(ValueError, match="token-mean"):
        shard_weight(first, full, "sum")


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_weighted_shards_add_up_to_the_whole_batch(mode):
    gen = torch.Generator().manual_seed(3)
    for n, k in [(7, 2), (9, 3), (5, 4)]:
        loss = torch.randn(n, 6, generator=gen)
        mask = torch.rand(n, 6, generator=gen) > 0.4
        mask[0] = False                                  # a sequence with no valid token
        parts = [shard_weight(mask[i], mask, mode) * aggregate_loss(loss[i], mask[i], mode, norm=8)
                 for i in torch.arange(n).tensor_split(k)]
        assert sum(parts) == pytest.approx(aggregate_loss(loss, mask, mode, norm=8).item(), abs=1e-6)


def _run_ranks(size: int, body) -> list:
    """body(group) on `size` threads of this process, one gloo group member each. -> results by rank."""
    store, host, port = open_store(size, timeout_s=30)
    results, errors = [None] * size, []

    def member(rank):
        try:
            group = Group(host, port, rank, size, "gloo", timeout_s=30, store=store if rank == 0 else None)
            results[rank] = body(group)
        except Exception as err:   # surfaced below with the rank
            errors.append((rank, err))

    threads = [threading.Thread(target=member, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


@pytest.mark.unit
def test_all_reduce_grads_sums_and_keeps_missing_grads_missing():
    def body(group):
        a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        a.grad = torch.full((3,), float(group.rank + 1))              # ranks give 1 and 2 -> 3
        if group.rank == 1:
            b.grad = torch.tensor([1.0, 2.0, 3.0])                   # only rank 1 has one -> rank 0 gets it too
        all_reduce_grads(group, [a, b, c])
        return a.grad.tolist(), b.grad.tolist(), c.grad
    for a, b, c in _run_ranks(2, body):
        assert a == [3.0, 3.0, 3.0] and b == [1.0, 2.0, 3.0]
        assert c is None                                             # nobody had one: the optimizer skips it


@pytest.mark.unit
def test_broadcast_carries_weights_version_and_checksum(tiny_task):
    from pipeline.models import load_causal_lm

    sender = load_causal_lm(tiny_task["model"])
    with torch.no_grad():
        for p in sender.parameters():
            p.add_(0.01)                                             # differs from the folder's weights
    spec, checksum = weights_spec(sender.state_dict()), state_checksum(sender.state_dict())

    def body(group):
        if group.rank == 0:
            return send_weights(group, sender.state_dict(), version=7, checksum=checksum)
        receiver = load_causal_lm(tiny_task["model"])
        version, sent_checksum, state = receive_weights(group, spec)
        receiver.load_state_dict(state)
        return version, sent_checksum, state_checksum(receiver.state_dict())
    sent_bytes, *received = _run_ranks(3, body)
    assert sent_bytes == sum(v.numel() * v.element_size() for v in sender.state_dict().values())
    assert received == [(7, checksum, checksum)] * 2


# ------------------------------------------------------------------------------ on Ray

def _scored_batch(cfg):
    """One real rollout of the tiny model, scored, with advantages from the configured estimator."""
    from pipeline.algorithms.advantages import AdvantageInputs, compute_advantages, place_sequence_reward
    from pipeline.batch import TrainBatch
    from pipeline.data.prompt_table import PromptSampler, read_prompt_table
    from pipeline.rollout.generator import RolloutGenerator
    from pipeline.trainers.ppo import PolicyLearner

    G = cfg.rollout.samples_per_prompt
    rows = PromptSampler(read_prompt_table(cfg.data.train_path, ("prompt",)), cfg.rollout.prompts_per_step, 0).next_batch()
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    groups = [b for b in range(len(rows)) for _ in range(G)]
    rollout = RolloutGenerator(cfg.model, cfg.rollout).generate(prompts, groups, list(range(len(prompts))), 0)
    scores = torch.rand(len(prompts), generator=torch.Generator().manual_seed(1)).round()   # 0/1 rewards
    single = PolicyLearner(cfg)
    batch = TrainBatch(rollout=rollout, scores=scores, score_failed=torch.zeros(len(prompts), dtype=torch.bool))
    batch.values = single.rollout_forward(rollout)["values"]
    a = cfg.algorithm
    batch.advantages, batch.returns = compute_advantages(a.name, AdvantageInputs(
        token_rewards=place_sequence_reward(scores, rollout.completion_mask), mask=rollout.completion_mask,
        group_ids=rollout.group_ids,
        values=batch.values, gamma=a.gamma, lam=a.lam, scale_by_std=a.scale_by_std))
    return single, batch


@pytest.mark.ray
@pytest.mark.parametrize("preset,k,extra", [
    ("grpo", 3, ["algorithm.loss_agg=token-mean"]),                   # 18 sequences, minibatches 8, 8, 2:
    ("ppo", 2, ["algorithm.loss_agg=seq-mean-token-mean"]),            # a rank gets an empty slice
])
def test_k_learners_update_exactly_like_one(tiny_task, ray_local, tmp_path, preset, k, extra):
    from actors.pools import connect_group
    from actors.shells import Learner
    from pipeline.config import load_config
    from pipeline.collective import DP_GROUP

    cfg = load_config(preset, [
        f"model.path={tiny_task['model']}", f"data.train_path={tiny_task['data']['train']}",
        "rollout.prompts_per_step=6", "rollout.samples_per_prompt=3", "rollout.max_new_tokens=4",
        "learner.minibatch_size=8", "learner.epochs=2", "learner.lr=1e-2", "learner.critic_lr=1e-2",
        "learner.max_grad_norm=0.5", "learner.warmup_steps=0", "algorithm.kl_coef=0", f"resources.learners={k}",
        f"train.output_dir={tmp_path}", *extra])
    single, batch = _scored_batch(cfg)
    learners = [Learner.options(num_cpus=0.5).remote(cfg, 1, rank, k) for rank in range(k)]
    try:
        connect_group(DP_GROUP, learners, "gloo", timeout_s=60)
        got = ray.get([learner.update.remote(batch) for learner in learners])
        want = single.update(batch)
        states = ray.get([learner.state.remote() for learner in learners])
    finally:
        for learner in learners:
            ray.kill(learner)
    for key in ("policy/loss", "policy/entropy", "optim/grad_norm"):
        assert got[0][key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert got[0] == got[-1]                                           # every rank reports the same figures
    reference, _ = single.state()
    initial = _initial_policy_state(cfg)
    for models, _ in states:
        for section, params in reference.items():
            for name, value in params.items():
                torch.testing.assert_close(models[section][name], value, rtol=1e-4, atol=1e-5, msg=name)
    moved = max((reference["policy"][n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 1e-3                                                # the update did change the weights


def _initial_policy_state(cfg) -> dict:
    from pipeline.models import load_causal_lm

    return load_causal_lm(cfg.model.path).state_dict()


@pytest.mark.ray
def test_collective_sync_keeps_every_generator_on_the_learners_weights(tiny_task, ray_local, tmp_path):
    """Each step's broadcast leaves every generator with the learner's checksum; a generator killed between
    steps is restarted, gets the weights through the object store, and the group is rebuilt around it."""
    from pipeline.config import load_config
    from actors.run import run_training

    cfg = load_config("grpo", [
        f"model.path={tiny_task['model']}", f"data.train_path={tiny_task['data']['train']}",
        f"data.eval_path={tiny_task['data']['eval']}", "data.eval_size=10", "train.steps=4", "train.eval_every=4",
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=3",
        "resources.rollout_workers=2", "resources.cpus_per_rollout_worker=0.5", "resources.cpus_per_learner=0.5",
        "resources.learners=2", "resources.torch_threads=1", "algorithm.kl_coef=0", "tracking.plot=false",
        "checkpoint.every=0", f"train.output_dir={tmp_path}/run", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"])
    seen = []

    def on_step(step, metrics, trainer):
        pools = trainer.pools
        learner_sums = ray.get([learner.checksum.remote() for learner in pools.learners])
        worker_sums = ray.get([g.weights_checksum.remote() for g in pools.generators])
        seen.append((step, metrics["sync/collective"], len(set(learner_sums + worker_sums))))
        if step == 2:
            os.kill(ray.get(pools.generators[0].pid.remote()), signal.SIGKILL)

    summary = run_training(cfg, on_step=on_step)            # joins the fixture's Ray
    assert summary["steps"] == 4
    assert [s for s, _, _ in seen] == [1, 2, 3, 4]
    assert all(n == 1 for _, _, n in seen), seen           # both learners and both generators: one checksum
    assert [c for _, c, _ in seen] == [1.0] * 4, seen       # step 3 rebuilt the group and broadcast again
