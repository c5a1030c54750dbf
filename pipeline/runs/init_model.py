"""A new model for a user's task, offline (`rlpipe init-model`): a tokenizer that covers the task's data and
a randomly initialised Llama of a named size, saved as a Hugging Face folder that `rlpipe sft` and
`rlpipe train` take as a model path.

The tokenizer is made from the data itself, from every text cell of the given files (string columns, lists
of strings, and the contents of chat messages):
- `char`: one token per character found (plus a chat template whose characters are added too), the
  demo's kind: exact for short symbolic tasks, no merges to learn;
- `bpe`: a byte-level BPE fitted to the texts: any input encodes (no unknown characters), shorter sequences.
The context length is the longest row in tokens (all its text columns together) times 2, rounded up to 64:
room for the completions RL samples.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from pipeline.data.prompt_table import DataError, read_prompt_table

# Named sizes. head_dim = 32 in each (vLLM's CPU attention needs >= 32); "tiny" is the demo's model.
MODEL_SIZES = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=344),      # ~0.8 M
    "small": dict(hidden_size=256, num_layers=6, num_heads=8, intermediate_size=688),     # ~5 M
    "base": dict(hidden_size=512, num_layers=8, num_heads=16, intermediate_size=1376),    # ~25 M
}
TOKENIZERS = ("char", "bpe")

# The character tokenizer's chat template: plain "role: content" lines, the BOS first.
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
_TEMPLATE_TEXT = "system: user: assistant: tool: \n"


def _texts(value) -> Iterable[str]:
    """Every string in a cell: the cell itself, a list's items, a message's role and content."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _texts(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _texts(v)


def data_rows(paths: list[str]) -> list[str]:
    """One text per row of every file: all its text cells joined (what one training sequence holds)."""
    rows = []
    for path in paths:
        table = read_prompt_table(path, required_columns=())
        for row in table.to_pylist():
            rows.append("".join(t for v in row.values() for t in _texts(v)))
    if not any(rows):
        raise DataError(f"no text found in {', '.join(map(str, paths))}: init-model builds the tokenizer from the "
                        "data's text columns (strings, lists of strings, chat messages)")
    return rows


def init_model(paths: list[str], out_dir, *, tokenizer: str = "char", size: str = "tiny",
               vocab_size: int = 1024, max_positions: Optional[int] = None, chat_template: bool = True,
               seed: int = 0) -> dict:
    """Build the tokenizer from the files' text and a random Llama of `size`; save both to `out_dir`.
    chat_template=False: a char vocabulary of the data's characters only (no template, none of its letters), so
    the model cannot emit a character no training example holds.
    Returns {"path", "tokenizer", "vocab_size", "parameters", "max_positions", "chars" (char only)}."""
    from pipeline.models import load_causal_lm
    from pipeline.small_models import build_bpe_model, build_bpe_tokenizer, build_tiny_model

    if size not in MODEL_SIZES:
        raise DataError(f"unknown model size {size!r}; valid: {', '.join(MODEL_SIZES)}")
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer kind {tokenizer!r}; valid: {', '.join(TOKENIZERS)}")
    rows = data_rows(paths)
    dims = MODEL_SIZES[size]
    info: dict = {"tokenizer": tokenizer}
    if tokenizer == "char":
        chars = "".join(sorted(set("".join(rows)) | (set(_TEMPLATE_TEXT) if chat_template else set())))
        longest = max(len(r) for r in rows)
        positions = max_positions or _context(longest)
        path = build_tiny_model(out_dir, max_positions=positions, seed=seed, chars=chars,
                                chat_template=CHAR_CHAT_TEMPLATE if chat_template else None, **dims)
        info["chars"] = chars
    else:
        fitted = build_bpe_tokenizer(rows, vocab_size)
        longest = max(len(ids) for ids in fitted(rows, add_special_tokens=False)["input_ids"])
        positions = max_positions or _context(longest)
        path = build_bpe_model(out_dir, arch="llama", texts=rows, vocab_size=vocab_size, dropout=0.0,
                               max_positions=positions, seed=seed, **dims)
    model = load_causal_lm(path)
    info.update(path=str(Path(path)), vocab_size=model.config.vocab_size, max_positions=positions,
                parameters=sum(p.numel() for p in model.parameters()), longest_row_tokens=longest)
    return info


def _context(longest_tokens: int) -> int:
    """Room for the longest row twice over (+ BOS/EOS), rounded up to a multiple of 64."""
    need = 2 * (longest_tokens + 2)
    return max(64, -(-need // 64) * 64)


__all__ = ["MODEL_SIZES", "TOKENIZERS", "CHAR_CHAT_TEMPLATE", "data_rows", "init_model"]
