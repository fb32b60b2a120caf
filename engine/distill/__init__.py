"""The distillation workflow around the teacher: dataset rows in, teacher signals out, losses for a trainer.

Modules: `rows` (JSONL/Parquet datasets -> token ids and target masks, length batching), `chat`
(the model's chat template, rendered as transformers renders it). Nothing here imports torch;
only the loss module does, when it is used.
"""
from __future__ import annotations

from .rows import Row, RowOptions, RowStats, length_batches, read_rows

__all__ = ["Row", "RowOptions", "RowStats", "read_rows", "length_batches"]
