"""Preference pairs for reward-model training: a table with a prompt, a chosen and a rejected response, and
optionally a margin (how much better chosen is; Llama 2's margin loss). Read and checked before anything is
written: every problem is one error naming the file, the column or rows, and the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from pipeline.data.prompt_table import DataError, hold_out, read_prompt_table


@dataclass
class PreferencePairs:
    path: str
    prompts: list
    chosen: list[str]
    rejected: list[str]
    margins: Optional[list[float]]

    def __len__(self) -> int:
        return len(self.prompts)

    def split(self, n_eval: int, seed: int) -> tuple["PreferencePairs", "PreferencePairs"]:
        """(train, held-out): `n_eval` pairs drawn at random (seeded) for evaluation, the rest for training."""
        return hold_out(self, n_eval, seed, "pairs")


def _rows(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:5]))
    return f"row {shown}" if len(indices) == 1 else f"rows {shown}{', ...' if len(indices) > 5 else ''} " \
        f"({len(indices)} in all)"


def read_preference_pairs(path, *, prompt_column: str = "prompt", chosen_column: str = "chosen",
                          rejected_column: str = "rejected", margin_column: Optional[str] = "margin") -> PreferencePairs:
    """Read a Parquet / JSON-lines file of pairs. The margin column is used when the file has it.
    Raises DataError for a missing column, responses that are not text, rows where chosen == rejected
    (they teach nothing and usually mean a broken export), and margins that are not finite numbers."""
    table = read_prompt_table(path, required_columns=(prompt_column, chosen_column, rejected_column))
    prompts = table.column(prompt_column).to_pylist()
    chosen = table.column(chosen_column).to_pylist()
    rejected = table.column(rejected_column).to_pylist()
    for name, values in ((chosen_column, chosen), (rejected_column, rejected)):
        bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
        if bad:
            raise DataError(f"{path}: {_rows(bad)} of column {name!r} not text (e.g. {values[bad[0]]!r:.40}); "
                            "chosen and rejected must hold the two responses as strings")
    same = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if c.strip() == r.strip()]
    if same:
        raise DataError(f"{path}: {_rows(same)} have chosen == rejected; a pair must prefer one response over a "
                        "different one: drop those rows")
    margins = None
    if margin_column and margin_column in table.column_names:
        margins = table.column(margin_column).to_pylist()
        bad = [i for i, m in enumerate(margins) if not isinstance(m, (int, float)) or isinstance(m, bool)
               or not math.isfinite(m)]
        if bad:
            raise DataError(f"{path}: {_rows(bad)} of column {margin_column!r} not a finite number; fill them "
                            "in or drop the column")
        margins = [float(m) for m in margins]
    return PreferencePairs(str(path), prompts, chosen, rejected, margins)


__all__ = ["PreferencePairs", "read_preference_pairs"]
