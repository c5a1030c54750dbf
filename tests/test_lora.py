"""LoRA through the training engine: merged weights equal peft's own merge, only adapters train and are
checkpointed, the base is the reference, K learners step like one, and the generators follow the adapters
after every sync (the check fails when the sync is skipped: the field's silent stale-LoRA bug)."""
import copy

import pytest
import ray
import torch

from pipeline.config import load_config


def _cfg(tiny_task, tmp_path, *extra, preset="grpo"):
    return load_config(preset, [
        f"model.path={tiny_task['model']}", f"data.train_path={tiny_task['data']['train']}",
        f"data.eval_path={tiny_task['data']['eval']}", "data.eval_size=10",
        "rollout.prompts_per_step=6", "rollout.samples_per_prompt=3", "rollout.max_new_tokens=4",
        "learner.minibatch_size=8", "learner.epochs=2", "learner.lr=5e-2", "learner.critic_lr=1e-2",
        "learner.warmup_steps=0", "lora.rank=4", "lora.alpha=8", f"train.output_dir={tmp_path}/run",
        *extra])


def _adapters_nonzero(model, seed=0):
    """Give every lora_B random values (fresh adapters have B = 0 and change nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.unit
def test_merged_state_is_peft_merge_and_leaves_the_model_alone(tiny_task):
    from pipeline.trainers.lora import apply_lora, merged_state
    from pipeline.models import load_causal_lm

    plain = load_causal_lm(tiny_task["model"])
    names = set(plain.state_dict())
    model = apply_lora(copy.deepcopy(plain), rank=4, alpha=8.0, dropout=0.0, target_modules=["all-linear"])
    _adapters_nonzero(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state(model)
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) == set(want) == names                        # the unwrapped model's own names
    for k in names:
        torch.testing.assert_close(merged[k], want[k], rtol=0, atol=1e-6, msg=k)
    assert any((merged[k] - plain.state_dict()[k]).abs().max() > 1e-3 for k in names)   # the adapters count
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())     # nothing merged in place
    # The merged weights compute what the wrapped model computes.
    plain.load_state_dict(merged)
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    torch.testing.assert_close(plain(ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_bad_target_modules_name_the_model_layers(tiny_task):
    from pipeline.trainers.lora import apply_lora
    from pipeline.models import load_causal_lm

    with pytest.raises(ValueError, match=r"lora.target_modules=\['qkv'\].*q_proj"):
        apply_lora(load_causal_lm(tiny_task["model"]), rank=2, alpha=4.0, dropout=0.0, target_modules=["qkv"])


@pytest.mark.unit
def test_only_adapters_train_and_checkpoint_and_the_base_is_the_reference(tiny_task, tmp_path):
    from pipeline.trainers.lora import merged_state
    from pipeline.models import load_causal_lm
    from pipeline.rollout.reference import ReferencePolicy
    from pipeline.trainers.ppo import PolicyLearner
    from tests.test_collective import _scored_batch

    cfg = _cfg(tiny_task, tmp_path, "algorithm.kl_coef=0.1")
    learner, batch = _scored_batch(cfg)
    engine = learner.policy
    assert {id(p) for p in engine.params} == {id(p) for n, p in engine.model.named_parameters() if "lora_" in n}
    base = {k: v.clone() for k, v in load_causal_lm(tiny_task["model"]).state_dict().items()}
    ref_before = learner.rollout_forward(batch.rollout, ref_logprobs=True)["ref_logprobs"]
    frozen = ReferencePolicy(cfg.model, cfg.rollout.temperature).logprobs(batch.rollout)
    torch.testing.assert_close(ref_before, frozen, rtol=1e-5, atol=1e-5)        # the base is the reference
    batch.ref_logprobs = ref_before
    learner.update(batch)
    after = learner.rollout_forward(batch.rollout, old_logprobs=True, ref_logprobs=True)
    torch.testing.assert_close(after["ref_logprobs"], frozen, rtol=1e-5, atol=1e-5)   # still, after an update
    assert (after["old_logprobs"] - frozen).abs().max() > 1e-3                        # while the policy moved
    unwrapped = {k.replace(".base_layer.", "."): v for k, v in engine.model.get_base_model().state_dict().items()
                 if ".lora_" not in k}
    assert all(torch.equal(unwrapped[k], base[k]) for k in base)                      # the base never trained
    assert any((merged_state(engine.model)[k] - base[k]).abs().max() > 1e-4 for k in base)

    models, optimizers = learner.state()
    assert models["policy"] and all(".lora_" in k for k in models["policy"])         # adapters only
    fresh = PolicyLearner(cfg)
    fresh.load_state(models, optimizers, learner.version)
    assert fresh.checksum() == learner.checksum()
    out = fresh.hf_files()                                                            # a plain, merged folder
    folder = tmp_path / "merged"
    folder.mkdir()
    for name, data in out.items():
        (folder / name).write_bytes(data)
    reloaded = load_causal_lm(str(folder)).state_dict()
    exported = learner.policy.export_state("float32")
    assert set(reloaded) <= set(exported)
    assert all(torch.allclose(reloaded[k], exported[k], atol=1e-6) for k in reloaded)

    other = PolicyLearner(_cfg(tiny_task, tmp_path, "lora.rank=2"))
    with pytest.raises(ValueError, match="lora.rank / lora.target_modules changed"):
        other.load_state(models, optimizers, learner.version)


@pytest.mark.unit
@pytest.mark.parametrize("sync", [True, False])
def test_generator_follows_the_adapters_after_every_sync(tiny_task, tmp_path, sync):
    """Three updates; after each the generator gets the learner's weights (or, sync=False, does not). The
    generator's own log-probs of its next rollout must equal the learner's current policy's: with the sync
    skipped they do not, so this check is one that can fail."""
    from pipeline.rollout.generator import RolloutGenerator
    from tests.test_collective import _scored_batch

    cfg = _cfg(tiny_task, tmp_path, "algorithm.kl_coef=0")
    learner, batch = _scored_batch(cfg)
    generator = RolloutGenerator(cfg.model, cfg.rollout)
    prompts = batch.rollout.prompts
    gaps = []
    for step in range(3):
        learner.update(batch)
        if sync:
            generator.set_weights(learner.export_weights())
        generator.version = learner.version               # a silent stale sync claims the version too
        rollout = generator.generate(prompts, batch.rollout.group_ids.tolist(), list(range(len(prompts))), step + 1)
        mine = learner.rollout_forward(rollout, old_logprobs=True)["old_logprobs"]
        gaps.append((mine - rollout.logprobs).abs()[rollout.completion_mask].max().item())
        batch.rollout = rollout
    if sync:
        assert max(gaps) < 1e-4, gaps
        assert generator.weights_checksum() == learner.checksum()
    else:
        assert min(gaps) > 1e-3, gaps


@pytest.mark.unit
def test_lora_run_needs_no_reference_actor(tiny_task, tmp_path):
    from actors.pools import layout

    roles = [r for r, _ in layout(_cfg(tiny_task, tmp_path, "algorithm.kl_coef=0.05"))]
    assert "reference" not in roles and "learner" in roles
    full = [r for r, _ in layout(_cfg(tiny_task, tmp_path, "algorithm.kl_coef=0.05", "lora.rank=0"))]
    assert "reference" in full


@pytest.mark.ray
@pytest.mark.parametrize("preset", ["grpo", "ppo"])
def test_k_lora_learners_update_exactly_like_one(tiny_task, ray_local, tmp_path, preset):
    from actors.pools import connect_group
    from actors.shells import Learner
    from pipeline.collective import DP_GROUP
    from tests.test_collective import _scored_batch

    # lr 1e-2: at 5e-2, 18 AdamW steps amplify the all-reduce's float order (1e-6 after the first update)
    # to 0.1 by the third, on one rank as on one learner; the parity holds to 1e-6 at 1e-2.
    cfg = _cfg(tiny_task, tmp_path, "algorithm.kl_coef=0", "resources.learners=2", "learner.lr=1e-2",
               preset=preset)
    single, batch = _scored_batch(cfg)
    learners = [Learner.options(num_cpus=0.5).remote(cfg, 1, rank, 2) for rank in range(2)]
    try:
        connect_group(DP_GROUP, learners, "gloo", timeout_s=60)
        for version in range(3):
            batch.rollout.policy_version = version            # the same batch, as if sampled afresh
            ray.get([learner.update.remote(batch) for learner in learners])
            single.update(batch)
        states = ray.get([learner.state.remote() for learner in learners])
    finally:
        for learner in learners:
            ray.kill(learner)
    want, _ = single.state()
    assert max(v.abs().max().item() for k, v in want["policy"].items() if "lora_B" in k) > 1e-3   # B moved from 0
    for models, _ in states:
        for section, params in want.items():
            assert set(models[section]) == set(params)
            for name, value in params.items():
                torch.testing.assert_close(models[section][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.ray
def test_lora_run_end_to_end_keeps_generators_on_the_merged_policy(tiny_task, ray_local, tmp_path):
    """A real run (collective sync, two generators, KL against the base): every step the generators hold the
    learner's merged checksum and sample with the learner's log-probs; --resume from the adapter checkpoint
    continues."""
    from actors.run import run_training

    overrides = ["train.steps=3", "train.eval_every=3", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
                 "resources.rollout_workers=2", "resources.cpus_per_rollout_worker=0.5",
                 "resources.cpus_per_learner=0.5", "resources.torch_threads=1", "algorithm.kl_coef=0.05",
                 "algorithm.old_logprobs=learner", "reward.functions=[tests.rewards_for_tests:sevens]",
                 "tracking.plot=false", "checkpoint.every=2",
                 f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"]
    seen = []

    def on_step(step, metrics, trainer):
        sums = ray.get([g.weights_checksum.remote() for g in trainer.pools.generators])
        seen.append((len(set(sums + trainer.learners.checksums())), metrics["policy/sampler_logprob_gap"],
                     metrics["policy/kl"]))

    summary = run_training(_cfg(tiny_task, tmp_path, *overrides), on_step=on_step)
    assert summary["steps"] == 3 and len(seen) == 3
    assert all(n == 1 for n, _, _ in seen), seen             # learner and both generators: one checksum
    assert all(gap < 1e-4 for _, gap, _ in seen), seen      # they sample from the policy the learner holds
    assert seen[-1][2] > 0                                   # the KL to the base is measured
    resumed = run_training(_cfg(tiny_task, tmp_path, *overrides[1:], "train.steps=4"), resume=True)
    assert resumed["steps"] == 4


def _pairs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(f"{a}+{b}=", str(a + b), str(a + b + 1 + (a % 3))) for a in range(10, 40) for b in range(10, 14)]
    prompts, chosen, rejected = zip(*rows)
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": list(prompts), "chosen": list(chosen), "rejected": list(rejected)}), path)
    return str(path)


@pytest.mark.unit
def test_a_lora_snapshot_restores_the_function_it_was_taken_of(tiny_task):
    """The best-weights path of early stopping under LoRA: `weights()` (merged) taken, training goes on, then
    `load_weights` (from the snapshot, or from a saved folder with strict=False) makes the model compute the
    snapshot's function again, and the saved folder is the plain model with the snapshot's weights."""
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.trainers.sft import SupervisedTrainer

    prompts, answers = ["12+34=", "50+21=", "33+33="], ["46", "71", "66"]
    torch.manual_seed(0)
    trainer = SupervisedTrainer(load_causal_lm(tiny_task["model"]), load_tokenizer(tiny_task["model"]), prompts,
                                answers, prompts, answers, answers, lr=5e-2, batch_size=3,
                                lora={"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]})
    for _ in range(3):
        trainer.train_step()
    snapshot, loss_then = trainer.weights(), trainer.evaluate()["eval/loss"]
    assert not any("lora" in k for k in snapshot)
    for _ in range(3):
        trainer.train_step()
    assert trainer.evaluate()["eval/loss"] != pytest.approx(loss_then, rel=1e-6)
    trainer.load_weights(snapshot)
    assert trainer.evaluate()["eval/loss"] == pytest.approx(loss_then, rel=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        trainer.load_weights({"not.a.weight": torch.zeros(1)}, strict=False)


@pytest.mark.unit
def test_sft_trains_lora_adapters_from_the_cli_and_resumes_exactly(tiny_task, tmp_path):
    """`rlpipe sft --lora-rank 4`: checkpoints hold only adapters, the result is a plain model folder (the base's
    names, the adapters merged), and a run stopped mid-way and resumed by `--resume` ends on the same weights."""
    from safetensors.torch import load_file

    from actors.cli import main
    from pipeline.checkpoint import latest_checkpoint, load_checkpoint
    from pipeline.runs.supervised import SFTConfig, run_sft

    flags = ["--model", tiny_task["model"], "--data", tiny_task["data"]["labelled"], "--eval-size", "20",
             "--lr", "2e-2", "--batch-size", "16", "--max-steps", "20", "--eval-every", "10",
             "--checkpoint-every", "10", "--patience", "null", "--lora-rank", "4", "--lora-alpha", "8"]
    assert main(["sft", "--out", str(tmp_path / "a"), *flags]) == 0
    base, a = load_file(f"{tiny_task['model']}/model.safetensors"), load_file(str(tmp_path / "a/model/model.safetensors"))
    assert a.keys() == base.keys()
    assert any(not torch.equal(a[k], base[k]) for k in a)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints"))
    assert ckpt.models["model"] and all("lora_" in k for k in ckpt.models["model"])

    class Stop(Exception):
        pass

    def stop_at_10(line):
        if line.startswith("step    10"):
            raise Stop

    cfg = SFTConfig(model=tiny_task["model"], data=tiny_task["data"]["labelled"], out=str(tmp_path / "b"),
                    eval_size=20, lr=2e-2, batch_size=16, max_steps=20, eval_every=10, checkpoint_every=10,
                    patience=None)
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    with pytest.raises(Stop):
        run_sft(cfg, log=stop_at_10)
    assert main(["sft", "--resume", str(tmp_path / "b")]) == 0
    b = load_file(str(tmp_path / "b/model/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.unit
def test_a_lora_reward_model_trains_its_new_head_in_full(tiny_task, tmp_path):
    from safetensors.torch import load_file

    from pipeline.checkpoint import latest_checkpoint, load_checkpoint
    from pipeline.rewards.models import build_reward_model
    from pipeline.models import load_tokenizer
    from pipeline.runs.supervised import RewardModelConfig, run_reward_model

    cfg = RewardModelConfig(model=tiny_task["model"], data=_pairs(tmp_path), out=str(tmp_path / "rm"), eval_size=20,
                            lr=2e-2, batch_size=9, max_steps=4, eval_every=4, patience=None)
    cfg.lora.rank = 4
    result = run_reward_model(cfg, log=lambda _: None)
    torch.manual_seed(cfg.seed)
    fresh = build_reward_model(tiny_task["model"], load_tokenizer(tiny_task["model"])).state_dict()
    saved = load_file(f"{result['model_dir']}/model.safetensors")
    assert not torch.equal(saved["score.weight"], fresh["score.weight"])        # the head trained
    assert all(".lora_" not in k for k in saved)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "rm" / "checkpoints")).models["model"]
    assert any(k.endswith("score.weight") for k in ckpt) and all("lora_" in k or "score" in k for k in ckpt)


@pytest.mark.unit
def test_supervised_engine_conflicts_are_one_line_naming_the_flags(tiny_task, tmp_path, capsys):
    from actors.cli import main

    base = ["sft", "--model", tiny_task["model"], "--data", tiny_task["data"]["labelled"], "--out",
            str(tmp_path / "r")]
    for extra, fragment in ((["--parallel", "shard", "--learners", "2", "--lora-rank", "4"], "--parallel: shard"),
                            (["--lora-rank", "4", "--lora-target-modules", "[q_proj, nope]"], "nope is not a module"),
                            (["--cpu-offload", "true"], "--cpu-offload offloads")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "r").exists()
