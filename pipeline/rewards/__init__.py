"""Rewards: reward functions by name, their composer and score shaping (`functions`), and learned reward
models as functions (`models`)."""
