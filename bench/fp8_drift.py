"""What an FP8 mode would cost in accuracy, emulated on the NumPy oracle (issue 12, item 3; no GPU).

An FP8 tensor-core GEMM (mma.sync m16n8k32 e4m3, or wgmma) multiplies float8 e4m3 operands with fp32
sums. This emulates its roundings on the oracle's forward, every other step unchanged:
- activations: every matmul's input rounded to e4m3, with one scale per row (amax / 448: the issue's
  "per-row scales") or one per 32 values of a row (a scale per k32 mma step, applied to the fp32
  partial sums with the weight's block scale), or per 16 (finer than one mma step: two half-steps);
- weights: exact, or rounded to e4m3 with one scale per 32-value block of a row, or with one scale
  per 128 x 128 block of the matrix. Exact is what the kernel gets for 4-bit quants (Q4_K, Q4_0,
  Q4_1: the integer quants 0..15 are exact in e4m3, the block scales and mins applied in fp32 per
  k32 step); per 32, what types whose quants do not fit e4m3 exactly (Q6_K's -32..31, Q5, Q8_0) get
  when expanded to e4m3 tiles; per 128 x 128 with activations per 128 values of a row, what
  cuBLASLt's block-scaled FP8 products offer on Hopper (scale modes VEC128_32F and BLK128x128_32F),
  the finest scaling a library GEMM takes there;
- the LM head in FP8 too, or kept at the fp16 path's precision (the oracle's float64 here).
Reported per model against the unmodified oracle over every position of one text: mean
KL(oracle || emulated) in nats and top-1 agreement: the issue's bounds are mean KL <= 1e-3 and
top-1 >= 99%. Products and sums are float64 as in the oracle (the kernel's fp32 sums add ~1e-7
relative, far below e4m3's 2^-4).

    python bench/fp8_drift.py [--model PATH ...] [--tokens N] [--by-product]

Without --model: Gemma 3 270M Q4_K_M and SmolLM2-135M Q4_1, the test suite's real models
(tests/realmodels.py finds or assembles them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from q4k_engine.fp8 import E4M3_MAX, e4m3  # the engine's e4m3 rounding (ties to even), equal to torch's

TEXT = ("The committee met on a rainy Tuesday to review the budget for the new library. After a long "
        "discussion about the cost of the roof, the heating system and the children's reading room, "
        "they agreed to ask the city for a second loan. Maria, who had chaired the meeting for six years, "
        "said that the building would open in the spring if the weather allowed the builders to finish "
        "the walls before winter. Several members asked whether the old books could be moved first, and "
        "the librarian explained that volunteers had already packed most of them into boxes labelled by "
        "subject: history, science, poetry, travel and local records going back to 1850.")


def scaled_e4m3(x: np.ndarray, axis_block: int | None = None) -> np.ndarray:
    """x [rows, cols] in e4m3 with one scale per row (axis_block None) or per `axis_block` values of
    a row (the last block may be partial), scale = amax / 448; zero blocks stay zero."""
    x = np.asarray(x, np.float64)
    rows, cols = x.shape
    if axis_block is None:
        blocks = x.reshape(rows, 1, cols)
    else:
        pad = -cols % axis_block
        blocks = np.pad(x, ((0, 0), (0, pad))).reshape(rows, -1, axis_block)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / E4M3_MAX, 1.0)
    out = (e4m3(blocks / scale) * scale).reshape(rows, -1)
    return out[:, :cols]


def scaled_e4m3_tiles(w: np.ndarray, tile: int) -> np.ndarray:
    """w [rows, cols] in e4m3 with one scale per tile x tile block (edge blocks partial)."""
    rows, cols = w.shape
    out = np.empty((rows, cols), np.float64)
    for r in range(0, rows, tile):
        for c in range(0, cols, tile):
            b = np.asarray(w[r:r + tile, c:c + tile], np.float64)
            amax = np.abs(b).max()
            scale = amax / E4M3_MAX if amax > 0 else 1.0
            out[r:r + tile, c:c + tile] = e4m3(b / scale) * scale
    return out


# The products of a layer by the names of their weights (q, k and v are one stacked product).
PRODUCTS = {"q+k+v": ("attn_q.", "attn_k.", "attn_v."), "o": ("attn_output.",), "gate/up": ("ffn_gate.", "ffn_up."),
            "down": ("ffn_down.",)}


def fp8_backend(act_block: int | None, weights: int | str | None, head_f16: bool, only: str | None = None):
    """A NumpyBackend whose matmuls see the FP8 roundings (module docstring): activation scales per
    row (act_block None) or per act_block values of a row; weights exact (None), in e4m3 per 32
    values of a row (32) or per 128 x 128 block ("128x128"). only: one of PRODUCTS, the layers'
    other products (and the LM head) kept at the oracle's precision."""
    from q4k_engine.backend_cpu import TILE_VALUES, NumpyBackend
    from q4k_engine.quants import dequantize_rows

    class Fp8Emulation(NumpyBackend):
        def matmul(self, x, w):
            if only is not None and not any(k in w.name for k in PRODUCTS[only]):
                return NumpyBackend.matmul(self, x, w)
            xq = scaled_e4m3(x, act_block)
            if weights is None:  # the oracle's own matmul (float64 sums) of the rounded input
                return NumpyBackend.matmul(self, xq, w)
            out = np.empty((xq.shape[0], w.rows), np.float32)
            step = max(1, TILE_VALUES // max(1, w.cols))  # the oracle's row chunks
            if weights == "128x128":
                step = -(-step // 128) * 128  # whole 128-row blocks
            for s in range(0, w.rows, step):
                e = min(w.rows, s + step)
                rows = dequantize_rows(w, s, e)
                wq = scaled_e4m3(rows, 32) if weights == 32 else scaled_e4m3_tiles(rows, 128)
                out[:, s:e] = xq @ wq.T
            return out

        def lm_head(self, x, w, dtype=np.float32):
            if head_f16 or only is not None:
                return NumpyBackend.matmul(self, x, w).astype(dtype, copy=False)
            return self.matmul(x, w).astype(dtype, copy=False)

    return Fp8Emulation()


def drift(path: Path, n_tokens: int, by_product: bool = False) -> list[str]:
    from q4k_engine.backend import Batch
    from q4k_engine.backend_cpu import NumpyBackend
    from q4k_engine.distill.stats import compare_logits
    from q4k_engine.forward import forward, upload
    from q4k_engine.loader import open_model
    from q4k_engine.tokenizer import build_tokenizer

    model = open_model(path)
    cfg = model.config
    ids = np.asarray(build_tokenizer(model.tokenizer, cfg.arch).encode(TEXT), np.int32)[:n_tokens]
    batch = Batch.from_lengths([len(ids)])
    be = NumpyBackend()
    w = upload(model, be)
    base = forward(cfg, w, be, ids, batch)
    types = sorted({t.dtype.name for t in model.tensors.values() if len(t.shape) == 2})
    lines = [f"{path.name} ({cfg.arch}, matrices {', '.join(types)}), {len(ids)} tokens of text:", "",
             "| activation scale | weights | LM head | mean KL | top-1 |", "|---|---|---|---|---|"]
    if by_product:  # the built mode's roundings (row scales, exact weights) on one kind of product at a time
        lines[2:] = ["| products in FP8 (row scales, exact weights; the rest and the LM head as the oracle) | mean KL | top-1 |",
                     "|---|---|---|"]
        for only in PRODUCTS:
            fb = fp8_backend(None, None, True, only)
            r = compare_logits(base, forward(cfg, upload(model, fb), fb, ids, batch))
            lines.append(f"| {only} | {r.kld.mean:.2e} | {r.same_top_p:.4f} |")
        return lines
    for act_block, weights, head_f16 in VARIANTS:
        fb = fp8_backend(act_block, weights, head_f16)
        r = compare_logits(base, forward(cfg, upload(model, fb), fb, ids, batch))
        wname = {None: "exact", 32: "e4m3, 32-value blocks", "128x128": "e4m3, 128x128 blocks"}[weights]
        lines.append(f"| {'row' if act_block is None else f'{act_block} values'} | {wname} | "
                     f"{'f16' if head_f16 else 'fp8'} | {r.kld.mean:.2e} | {r.same_top_p:.4f} |")
    return lines


# (activation scale block (None: a row), weight rounding (None: exact, 32: per 32 values of a row,
# "128x128": per 128 x 128 block), LM head kept at f16). The last: cuBLASLt's block scaling on Hopper.
VARIANTS = [(None, None, False), (None, None, True), (None, 32, True),
            (32, None, False), (32, None, True), (32, 32, True), (16, None, True),
            (128, "128x128", True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", type=Path, help="GGUF or APR file (repeatable)")
    ap.add_argument("--tokens", type=int, default=256, help="at most this many tokens of the text")
    ap.add_argument("--by-product", action="store_true",
                    help="FP8 on one kind of product at a time (q+k+v, o, gate/up, down): which ones drift")
    args = ap.parse_args()
    paths = args.model
    if not paths:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import realmodels

        paths = [realmodels.gemma_path(), realmodels.smollm_path()]
    for p in paths:
        print("\n".join(drift(p, args.tokens, args.by_product)) + "\n", flush=True)


if __name__ == "__main__":
    main()
