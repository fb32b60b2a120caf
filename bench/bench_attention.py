"""Prefill attention: the tensor-core kernel (kernels/ops.cu attn_flash) against the fp32 kernel it
replaced and against torch's scaled_dot_product_attention in f16, on the same shapes in one run.

    python bench/bench_attention.py --out attn.md [--baseline-src old_ops.cu] [--variants]

--baseline-src: an older kernels/ops.cu that still has attn_tiled (e.g. `git show 699702e:kernels/ops.cu`),
timed with that version's launch configuration. --variants: also time other tilings of the new
kernel (ops.FlashTiles), to choose ops._flash_tiles.

Useful work: 4 * head_dim flops per visible (query, key, query head) triple (causal or sliding
window). Times are medians of CUDA events after a warm-up; ours include the f32->f16 pass over K/V,
torch's inputs are f16 already ([B, H, T, D], k/v heads repeated beforehand so that its flash
backend applies; the repeat is not timed). torch gets a boolean mask
for a sliding window, which moves it off its flash backend: that row compares less fairly.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import median_ms  # noqa: E402  (CUDA-event medians, shared with the model bench)

MODELS = {  # name: (q heads, kv heads, head dim)
    "qwen2-7b": (28, 4, 128),
    "gemma3-270m": (4, 1, 256),
    "smollm2-135m": (9, 3, 64),
}
CASES = [  # model, sequence lengths (equal, so torch takes them as a batch), window
    ("qwen2-7b", [2048], 0),
    ("qwen2-7b", [512] * 4, 0),
    ("qwen2-7b", [2048] * 2, 0),
    ("qwen2-7b", [2048], 512),
    ("gemma3-270m", [2048], 0),
    ("gemma3-270m", [2048] * 2, 0),
    ("gemma3-270m", [2048], 512),
    ("smollm2-135m", [2048], 0),
]
VARIANTS = {  # FlashTiles fields: warps, 16-row slices per warp, keys per tile, min blocks per SM
    128: [(4, 1, 64), (4, 1, 32), (4, 2, 32), (2, 2, 32), (4, 1, 64, 3), (2, 1, 32)],
    256: [(4, 1, 32), (2, 1, 32)],
    64: [(4, 1, 64), (2, 1, 64), (4, 2, 64), (2, 2, 64), (4, 2, 32)],
}


def visible_pairs(t: int, window: int) -> int:
    """(query, key) pairs a causal, optionally windowed, sequence of t tokens computes."""
    if window <= 0 or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


@functools.lru_cache(maxsize=None)
def old_kernel_launcher(src_path: str, d: int):
    """attn_tiled from an older ops.cu, with that version's launch: 32 query rows x 32 keys per tile."""
    import cupy as cp

    from q4k_engine.kernels.build import _arch

    mod = cp.RawModule(code=Path(src_path).read_text(), backend="nvrtc",
                       options=("-std=c++17", f"--gpu-architecture={_arch(cp.cuda.Device().id)}", f"-DHEAD_DIM={d}"))
    f = mod.get_function("attn_tiled")
    dp = -(-d // 4) * 4
    smem = ((32 + 32) * (dp + 4) + 32 * 33) * 4
    if smem > 48 * 1024:
        f.max_dynamic_shared_size_bytes = smem

    def run(q, k, v, y, lay, scale, window):
        hq, hkv = q.shape[1], k.shape[1]
        grid = (-(-lay.max_q_len * (hq // hkv) // 32), hkv, len(lay.q_len))
        f(grid, (128,), (q, k, v, y, lay.q_start, lay.q_len, lay.q_pos0, lay.kv_off, lay.kv_len, np.int32(hq),
                         np.int32(hkv), np.int32(window), np.float32(scale / math.log(2.0))), shared_mem=smem)

    return run


def torch_sdpa(q, k, v, lengths, window):
    """A closure running torch SDPA in f16 on copies of the cupy inputs, and its output as [N, H, D]."""
    import torch
    import torch.nn.functional as F

    assert torch.cuda.current_stream().cuda_stream == 0, "torch must share cupy's legacy default stream"
    b, t = len(lengths), lengths[0]

    def to_bhtd(x):
        return torch.as_tensor(x, device="cuda").to(torch.float16).reshape(b, t, x.shape[1], x.shape[2]) \
            .transpose(1, 2).contiguous()

    g = q.shape[1] // k.shape[1]
    tq = to_bhtd(q)
    tk, tv = (to_bhtd(x).repeat_interleave(g, dim=1) for x in (k, v))
    mask = None
    if window > 0:
        i = torch.arange(t, device="cuda")
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    scale = q.shape[2] ** -0.5

    def run():
        return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, is_causal=mask is None, scale=scale)

    return run, lambda: run().transpose(1, 2).reshape(q.shape).float()


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the markdown tables to this file")
    ap.add_argument("--baseline-src", help="an older kernels/ops.cu with attn_tiled, timed as 'fp32 (old)'")
    ap.add_argument("--variants", action="store_true", help="time other tilings of the new kernel")
    args = ap.parse_args()

    import cupy as cp
    import torch

    from q4k_engine.kernels import ops

    rng = cp.random.default_rng(0)
    rows, var_rows = [], []
    for model, lengths, window in CASES:
        hq, hkv, d = MODELS[model]
        n = sum(lengths)
        q = rng.standard_normal((n, hq, d), dtype=cp.float32)
        k = rng.standard_normal((n, hkv, d), dtype=cp.float32)
        v = rng.standard_normal((n, hkv, d), dtype=cp.float32)
        cu = np.concatenate([[0], np.cumsum(lengths)])
        lay = ops.SeqLayout.build(cu[:-1], lengths, np.zeros(len(lengths)), cu[:-1], lengths)
        scale = d ** -0.5
        gflop = 4 * d * hq * sum(visible_pairs(t, window) for t in lengths) / 1e9
        y = cp.empty_like(q)
        new_ms = median_ms(lambda: ops.attention(q, k, v, lay, scale, window, out=y), reps=20)
        sdpa, sdpa_out = torch_sdpa(q, k, v, lengths, window)
        sdpa_ms = median_ms(sdpa, reps=20)
        ref = cp.asarray(sdpa_out())
        diff = float(cp.abs(y - ref).max() / cp.abs(ref).max())  # both f16-operand: a sanity check, not an error
        old = "–"
        if args.baseline_src:
            run_old = old_kernel_launcher(args.baseline_src, d)
            y_old = cp.empty_like(q)
            old_ms = median_ms(lambda: run_old(q, k, v, y_old, lay, scale, window), reps=20)
            old = f"{old_ms:.3f} ms ({gflop / old_ms:.1f})"
        shape = f"{model} {lengths[0]}x{len(lengths)}" + (f" w{window}" if window else "")
        rows.append([shape, old, f"{new_ms:.3f} ms", f"{gflop / new_ms:.0f}", f"{sdpa_ms:.3f} ms",
                     f"{gflop / sdpa_ms:.0f}", f"{sdpa_ms / new_ms:.2f}", f"{diff:.1e}"])
        print(" | ".join(rows[-1]), flush=True)
        if args.variants:
            for tiles in (ops.FlashTiles(*t) for t in VARIANTS.get(-(-d // 16) * 16, [])):
                ms = median_ms(lambda: ops._flash_prefill(q, k, v, y, lay, scale, window, tiles), reps=20)
                var_rows.append([shape, f"{tiles.warps}w x {tiles.slices}s x {tiles.keys}k, min {tiles.min_blocks}/SM",
                                 f"{ms:.3f} ms", f"{gflop / ms:.0f}"])
                print(" | ".join(var_rows[-1]), flush=True)

    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    text = (f"Prefill attention, {dev}, torch {torch.__version__}; TFLOP/s = 4·d·(visible pairs)·(q heads) / time "
            f"(in parentheses for the old kernel)\n\n"
            + fmt_table(["shape", "fp32 (old)", "tensor-core (new)", "TFLOP/s", "torch SDPA f16", "TFLOP/s",
                         "SDPA time / new", "max|new-SDPA|/max|SDPA|"], rows))
    if var_rows:
        text += ("\n\nTilings of the new kernel (warps per block x 16-row slices per warp x keys per K/V tile, "
                 "min blocks per SM), f16 K/V pass included\n\n")
        text += fmt_table(["shape", "tiling", "time", "TFLOP/s"], var_rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
