"""A mixed distillation dataset for tests: `text`, `input_ids` and chat `messages` rows.

    from distill_data import mixed_rows, write_jsonl
    write_jsonl(tmp_path / "data.jsonl", mixed_rows(200, teacher.vocab_size, seed))

Rows cycle text, input_ids, messages (so every kind is present from n >= 3), with lengths from a
few tokens to a few hundred, so that length batching and sharding have something to group. The
messages use the roles system/user/assistant that every synthetic model's template accepts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

WORDS = ("the ferry leaves the north bank at seven in the morning and on most days it is full before "
         "bell rings people carry bread tools letters small animals baskets river wide water moves slowly "
         "market stalls honey apples pears plums prices chalk coins bridge town council captain lamps deck "
         "naïve café 3 42 2026 — don't it's").split()


def _sentence(rng: np.random.Generator, n_words: int) -> str:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n_words)]
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", ""])


def mixed_rows(n: int, vocab: int, seed: int) -> list[dict[str, Any]]:
    """n rows: row i is text (i % 3 == 0), input_ids (1) or messages (2); deterministic in seed."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        long = rng.random() < 0.1  # a tail of longer rows, as real datasets have
        if i % 3 == 0:
            rows.append({"text": _sentence(rng, int(rng.integers(40, 120) if long else rng.integers(1, 30)))})
        elif i % 3 == 1:
            length = int(rng.integers(100, 300) if long else rng.integers(1, 60))
            rows.append({"input_ids": rng.integers(0, vocab, length).tolist()})
        else:
            messages = []
            if rng.random() < 0.3:
                messages.append({"role": "system", "content": _sentence(rng, int(rng.integers(3, 10)))})
            for _ in range(int(rng.integers(1, 3))):
                messages.append({"role": "user", "content": _sentence(rng, int(rng.integers(2, 15)))})
                messages.append({"role": "assistant",
                                 "content": _sentence(rng, int(rng.integers(30, 80) if long else rng.integers(1, 20)))})
            rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path | str, rows: Sequence[Any]) -> Path:
    """One JSON value per line, UTF-8 (non-ASCII kept as is, as datasets usually are)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
