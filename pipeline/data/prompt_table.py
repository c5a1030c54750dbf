"""Prompt data: reading user prompt tables and a resumable prompt sampler.

A prompt table is an Arrow table with at least a `prompt` column; any other columns (e.g. `answer`)
travel with each row to the reward function.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from pipeline.errors import UserInputError


class DataError(UserInputError):
    """A prompt file that cannot be used; the message names the file and the fix."""


# ----------------------------------------------------------------------------- reading prompt files

def read_prompt_table(path, required_columns=("prompt",)) -> pa.Table:
    """Read a Parquet (.parquet) or JSON-lines (.jsonl / .json, one object per line) prompt table.

    Raises DataError for a missing file, an unsupported extension, an unreadable file, a missing column
    (listing the columns present) or an empty table.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist; check the path (relative paths are "
                        f"resolved from {Path.cwd()})")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(path)
        elif suffix in (".jsonl", ".json"):
            import pyarrow.json as pj
            table = pj.read_json(path)
        else:
            raise DataError(f"prompt file {path} has unsupported extension {suffix!r}; use .parquet, "
                            ".jsonl or .json (JSON lines: one object per line)")
    except DataError:
        raise
    except (pa.ArrowException, OSError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot read prompt file {path}: {first_line}. Make sure it is valid "
                        f"{'Parquet' if suffix == '.parquet' else 'JSON lines (one object per line)'}") from None
    require_columns(table, path, required_columns)
    if table.num_rows == 0:
        raise DataError(f"prompt file {path} has no rows; give it at least one prompt")
    return table


def require_columns(table: pa.Table, path, columns) -> None:
    """Raise DataError naming the file, the missing columns and those present, unless `table` has all `columns`."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"prompt file {path} lacks column(s) {', '.join(missing)}; columns present: "
                        f"{', '.join(table.column_names) or '(none)'}. Rename the column or point the "
                        "config at the right one")


def _is_empty_prompt(prompt) -> bool:
    """A prompt with nothing to answer: null, blank text, or messages whose contents are all blank."""
    if isinstance(prompt, list):
        return not any(isinstance(m, dict) and str(m.get("content") or "").strip() for m in prompt)
    return prompt is None or (isinstance(prompt, str) and not prompt.strip())


def drop_empty_prompts(table: pa.Table, column: str, field: str, path, log: Callable[[str], None] = print) -> pa.Table:
    """`table` without its rows whose `column` prompt is empty (`_is_empty_prompt`), counted in one printed line;
    a DataError when every prompt is empty. An empty prompt trains nothing the user meant: the policy would
    learn to answer a bare BOS. `field` names the config field of `path` in the messages."""
    prompts = table.column(column).to_pylist()
    keep = [i for i, p in enumerate(prompts) if not _is_empty_prompt(p)]
    if not keep:
        raise DataError(f"{field} {path}: every prompt of column {column!r} is empty ({len(prompts)} rows); fill "
                        "the prompts in, or point data.prompt_column at the column that holds them")
    if len(keep) < len(prompts):
        log(f"{field} {path}: dropped {len(prompts) - len(keep)} of {len(prompts)} prompts that are empty")
        table = table.take(keep)
    return table


def default_eval_size(n: int) -> int:
    """Rows held out when the user names no count: 10% of the n rows, at most 200, at least 1."""
    return min(200, max(1, n // 10))


def hold_out(rows, n_eval: Optional[int], seed: int, unit: str = "rows"):
    """(train, held-out) copies of `rows`, a dataclass with a `path` and per-row list fields (a field that is
    None, an absent optional column, stays None): `n_eval` rows drawn at random (seeded) are held out
    (None: `default_eval_size`)."""
    import dataclasses

    n = len(rows)
    n_eval = default_eval_size(n) if n_eval is None else n_eval
    if not 0 < n_eval < n:
        raise DataError(f"{rows.path}: cannot hold out {n_eval} of {n} {unit} for evaluation; give --eval-data, or "
                        f"a --eval-size between 1 and the number of {unit} - 1")
    order = np.random.default_rng(seed).permutation(n)

    def take(index) -> object:
        return dataclasses.replace(rows, **{f.name: [getattr(rows, f.name)[int(i)] for i in index]
                                            for f in dataclasses.fields(rows) if isinstance(getattr(rows, f.name), list)})
    return take(order[n_eval:]), take(order[:n_eval])


# ----------------------------------------------------------------------------- sampling

class PromptSampler:
    """Hands out batches of rows (dicts) from a table, reshuffled each epoch with seed + epoch.

    A batch may span an epoch boundary. `state_dict()` is {"epoch", "position"}: restoring it makes a
    resumed run draw exactly the prompts the interrupted one would have drawn next.
    """

    def __init__(self, table: pa.Table, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if table.num_rows == 0:
            raise DataError("cannot sample prompts from an empty table")
        self.rows = table.to_pylist()
        self.batch_size = batch_size
        self.seed = seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(len(self.rows))

    def next_batch(self) -> list[dict]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self.rows):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), len(self.rows) - self.position)
            batch += [self.rows[i] for i in self._order[self.position:self.position + take]]
            self.position += take
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


__all__ = ["DataError", "read_prompt_table", "require_columns", "drop_empty_prompts", "default_eval_size", "hold_out", "PromptSampler"]
