"""Signal directories written here with pyarrow and safetensors directly, to the layout documented
in the README and engine/distill/reader.py (manifest.json + top-k Parquet or dense safetensors
shards), so the reader and `compare` are tested against the format itself rather than against
their own writer. Import from a test as `from signals_dirs import write_signals`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np


def log_softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(x, np.float64) / temperature
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def topk_columns(logits: np.ndarray, k: int, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int32 [T, K], log-probs [T, K] descending, tail float32 [T]) of raw logits [T, V]."""
    lp = log_softmax(logits, temperature)
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(lp, ids, 1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.maximum(1.0 - np.exp(vals).sum(1), 0.0)) if k < lp.shape[1] else np.full(len(lp), -np.inf)
    return ids.astype(np.int32), vals, tail.astype(np.float32)


def write_signals(directory: Path, rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], kind: str, *,
                  k: int = 8, temperature: float = 1.0, shard_rows: int = 3, dtype: str = "float32",
                  complete: bool = True, indices: Sequence[int] | None = None) -> Path:
    """rows: (input_ids [T], target_mask [T], raw logits [T, V]) per stored row; indices: their dataset
    row indices (default 0, 1, ...; gaps are bad rows a run skipped). Shard i covers the indices
    [i * shard_rows, (i + 1) * shard_rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    vocab = rows[0][2].shape[1]
    indices = np.arange(len(rows)) if indices is None else np.asarray(indices)
    total = int(indices[-1]) + 1
    shards = []
    for n, start in enumerate(range(0, total, shard_rows)):
        end = min(total, start + shard_rows)
        sel = np.flatnonzero((indices >= start) & (indices < end))
        part = [rows[i] for i in sel]
        index = indices[sel].astype(np.int64)
        if kind == "topk":
            name = f"shard-{n:05d}.parquet"
            cols = [topk_columns(lg, k, temperature) for _, _, lg in part]
            table = pa.table({
                "row_index": pa.array(index, pa.int64()),
                "input_ids": pa.array([ids.astype(np.int32) for ids, _, _ in part], pa.list_(pa.int32())),
                "target_token_ids": pa.array([list(c[0]) for c in cols], pa.list_(pa.list_(pa.int32()))),
                "target_logprobs": pa.array([list(c[1].astype(dtype)) for c in cols],
                                            pa.list_(pa.list_(pa.float16() if dtype == "float16" else pa.float32()))),
                "tail_logmass": pa.array([c[2] for c in cols], pa.list_(pa.float32())),
                "target_mask": pa.array([m.astype(bool) for _, m, _ in part], pa.list_(pa.bool_())),
            })
            pq.write_table(table, directory / name)
        else:
            name = f"shard-{n:05d}.safetensors"
            lengths = [len(ids) for ids, _, _ in part]
            save_file({
                "logits": np.concatenate([lg for _, _, lg in part]).astype(dtype),
                "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                "input_ids": np.concatenate([ids for ids, _, _ in part]).astype(np.int32),
                "row_index": index,
                "target_mask": np.concatenate([m for _, m, _ in part]).astype(np.uint8),
            }, str(directory / name), metadata={"temperature": "1.0", "vocab_size": str(vocab)})
        data = (directory / name).read_bytes()
        shards.append({"file": name, "rows": [start, end], "n_rows": len(part), "tokens": sum(len(r[0]) for r in part),
                       "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {
        "format": "q4k-engine-signals", "format_version": 1, "q4k_engine_version": "0.1.0",
        "model": {"file": "test.apr", "sha256": "0" * 64, "arch": "llama", "vocab_size": vocab},
        "options": {"kind": kind, "k": k if kind == "topk" else None, "temperature": temperature,
                    "vocab_size": vocab, "dtype": dtype, "max_seq_len": None, "assistant_only": False,
                    "chat_template": None, "input": {"file": "rows.jsonl", "sha256": "0" * 64}},
        "shards": shards, "complete": complete, "stats": {"rows": len(rows)},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return directory


def teacher_rows(teacher, seqs: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(input_ids, target_mask, logits) of each sequence from a TeacherModel: every position but the
    last is a target (the README's rule without --assistant-only)."""
    logits, lengths = teacher.logits_per_position(seqs, output="numpy")
    out = []
    for i, n in enumerate(lengths):
        mask = np.ones(n, bool)
        mask[-1] = False
        out.append((np.asarray(seqs[i], np.int32), mask, logits[i, :n]))
    return out
