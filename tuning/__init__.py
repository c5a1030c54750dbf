"""Hyperparameter sweeps over the training pipeline with Ray Tune, recorded in MLflow.

- `tuning.space`: the search space as YAML data, validated against `RunConfig` (`SpaceError`).
- `tuning.trainable`: one Tune trial = one `run_training` call inside the trial's placement group.
- `tuning.sweep`: the Tuner (ASHA or PBT), the MLflow parent run and the end-of-sweep report;
  `rlpipe tune` and `python -m tuning.sweep` run it.
"""
