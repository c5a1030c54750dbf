"""Runs: what the commands do before and around training. Checks before anything is written (`preflight`), the
supervised commands' runs (`supervised`), `init-model` (`init_model`) and the run folder every command keeps."""
