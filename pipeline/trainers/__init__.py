"""Trainers: objectives on one engine. The engine (`engine`: precision, micro-batches, sharding, state) with
LoRA (`lora`); PPO's learner (`ppo`), SFT (`sft`), reward models (`reward_model`) and the supervised loop."""
