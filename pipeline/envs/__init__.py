"""Environments (coming, issue 28): multi-turn episodes and tools behind a Gymnasium-shaped interface, which the
generator's agent loop steps; a single-turn reward function is the one-step case."""
