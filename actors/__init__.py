"""The Ray runtime: every line of rlpipe that touches Ray lives here (and in `tuning/`, on top).

- `shells`: the `@ray.remote` shells, a few lines each around a plain class of `pipeline/`.
- `pools`: the placement group that reserves the actors' resources, starting them, forming their groups.
- `resilient`: gathering sharded calls when an actor may die (resend to the restarted actor).
- `learner_group`: the K data-parallel learners as one learner (every verb fans out, rank 0 answers).
- `weight_sync`: new weights to the generators, version and checksum verified, with fallback and recovery.
- `driver`: the step loop (`Trainer`); `run`: a training run end to end; `demo`: the local demo.
- `cli`: the `rlpipe` command; `train`: `python -m actors.train` for `ray job submit`.
"""
