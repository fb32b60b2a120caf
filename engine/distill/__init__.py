"""The distillation workflow around the teacher: datasets in, teacher signals out in shards, shards
read back, losses for a trainer, and the statistics that compare two models.

Modules: `rows` (JSONL/Parquet datasets -> token ids and target masks, length batching), `chat`
(the model's chat template, rendered as transformers renders it), `reader` (shard directories),
`stats` (llama-perplexity's KL-divergence statistics), `losses` (PyTorch).

Only the losses need PyTorch, and it is imported when one of them is first used:
`from q4k_engine.distill import kl_div_dense` (or `q4k_engine.distill.losses`) imports torch;
`import q4k_engine.distill` does not.
"""
from __future__ import annotations

from typing import Any

from .rows import Row, RowOptions, RowStats, length_batches, read_rows

__all__ = ["Row", "RowOptions", "RowStats", "read_rows", "length_batches", "kl_div_dense", "kl_div_topk"]

_LOSSES = ("kl_div_dense", "kl_div_topk")


def __getattr__(name: str) -> Any:
    if name in _LOSSES:
        from . import losses

        return getattr(losses, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
