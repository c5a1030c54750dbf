"""The demo task: "a<op>b=" -> answer problems, in disjoint labelled / RL / held-out splits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data.prompt_table import DataError

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_arithmetic_task(out_dir, digits: int = 3, op: str = "+", n_labelled: int = 2000,
                         n_rl: int = 50000, n_eval: int = 500, seed: int = 0) -> dict[str, str]:
    """Write three disjoint splits of "a<op>b=" -> answer problems as Parquet (columns prompt, answer).

    Both operands have exactly `digits` digits (e.g. 100..999), so every prompt of a task has the same
    length and difficulty comes only from the carries; the answer is the plain integer ("37+48=" ->
    "85"; with "-" it may be negative). Splits, drawn without replacement from all operand pairs:
      labelled.parquet  the small supervised split (the warm start trains on it),
      train.parquet     the big RL prompt pool (RL sees only prompts; answers feed the verifier),
      eval.parquet      held out, for every accuracy number.
    Deterministic in `seed`. Returns {"labelled": path, "train": path, "eval": path}.
    """
    import pyarrow.parquet as pq

    if op not in OPS:
        raise DataError(f"unknown operator {op!r}; valid: {', '.join(OPS)}")
    if digits < 1:
        raise DataError(f"digits must be >= 1, got {digits}")
    low, span = 10 ** (digits - 1), 9 * 10 ** (digits - 1)      # operands low .. low+span-1
    sizes = {"labelled": n_labelled, "train": n_rl, "eval": n_eval}
    total = sum(sizes.values())
    if total > span * span:
        raise DataError(f"{total} problems requested but only {span * span} distinct {digits}-digit "
                        f"pairs exist; lower n_rl/n_labelled/n_eval or raise digits")
    rng = np.random.default_rng(seed)
    pair_index = rng.choice(span * span, size=total, replace=False)  # distinct pairs -> disjoint splits
    a, b = low + pair_index // span, low + pair_index % span
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, start = {}, 0
    for name, n in sizes.items():
        xs, ys = a[start:start + n].tolist(), b[start:start + n].tolist()
        start += n
        table = pa.table({
            "prompt": [f"{x}{op}{y}=" for x, y in zip(xs, ys)],
            "answer": [str(OPS[op](x, y)) for x, y in zip(xs, ys)],
        })
        paths[name] = str(out / f"{name}.parquet")
        pq.write_table(table, paths[name])
    return paths
