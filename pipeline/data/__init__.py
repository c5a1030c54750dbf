"""Data: what a run reads. Prompt files and their sampler (`prompt_table`), how a prompt becomes tokens
(`prompt_format`), demonstrations for SFT (`demonstrations`) and preference pairs for reward models."""
