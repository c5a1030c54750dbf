"""A reward a randomly initialised tiny model can earn by chance, so learning shows without a warm start."""


def sevens(prompts, completions, **columns):
    """Share of completion characters that are '7'."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def dies_once(prompts, completions, **columns):
    """Ends its own process the first time it is called (marker file from $RLPIPE_DIE_MARKER), then
    scores like `sevens`: a scorer that dies mid-step, by its process, exactly once."""
    import os

    marker = os.environ["RLPIPE_DIE_MARKER"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return sevens(prompts, completions)


def flaky(prompts, completions, **columns):
    """Raises on any batch of more than one sample that holds a '1', and on each such sample alone: a reward
    whose batch mode is broken and that fails on some samples."""
    if any("1" in c for c in completions) and len(completions) > 1:
        raise ValueError("batch mode broken")
    return [1 / 0 if "1" in c else 0.5 for c in completions]


def wordy(prompts, completions, **columns):
    """Returns text, not a number, for every sample: every sample's reward fails."""
    return ["great" for c in completions]


class DiesOnceEnv:
    """An environment that ends its own process (its generator's) at its first step anywhere, once (marker file
    from $RLPIPE_DIE_MARKER); otherwise two turns paying 1 for a turn holding a 7."""

    stop = ["="]

    def reset(self, row, seed):
        self.turns = 0
        return row["prompt"]

    def step(self, action):
        import os

        marker = os.environ["RLPIPE_DIE_MARKER"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        self.turns += 1
        return " 1 ", float("7" in action), self.turns == 2, False, {}
