"""The local demo's task and warm start: 3-digit addition, a character-level Llama built offline
(`pipeline.small_models`), supervised fine-tuning to a plateau, and the continued-SFT baseline. The RL half
of the demo runs on Ray (`actors.demo`)."""
