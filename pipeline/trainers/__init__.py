"""Trainers: objectives on top of the shared `pipeline.engine.TrainEngine`.

- `ppo`: the PPO-family learner (clipped policy loss, KL to a reference, entropy, a critic's value loss).
- `sft`: supervised fine-tuning (token-mean NLL of the response), with held-out exact match and early stopping.
"""
