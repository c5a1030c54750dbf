"""A reward a randomly initialised tiny model can earn by chance, so learning shows without a warm start."""


def sevens(prompts, completions, **columns):
    """Share of completion characters that are '7'."""
    return [c.count("7") / max(len(c), 1) for c in completions]
