"""The split-K decode plan (kernels/ops.decode_splits), host side, without a GPU: enough blocks to
fill the SMs, a grid that holds every query's ranges, ranges that cover its visible keys once.
The kernels themselves are judged against the oracle in tests/test_ops_gpu.py."""
from __future__ import annotations

import pytest

from q4k_engine.kernels.ops import DECODE_BLOCKS_PER_SM, DECODE_MIN_KEYS, decode_splits


def ranges(n_vis: int, max_splits: int) -> list[tuple[int, int]]:
    """The key ranges of one query as ops.cu cuts them (dec_n_splits, then equal chunks)."""
    n_split = max(1, min(max_splits, -(-n_vis // DECODE_MIN_KEYS)))
    chunk = -(-n_vis // n_split)
    return [(s * chunk, min(n_vis, (s + 1) * chunk)) for s in range(n_split)]


@pytest.mark.parametrize("n,hq,hkv,sms", [(1, 28, 4, 132), (3, 28, 4, 132), (8, 28, 4, 132), (1, 16, 1, 46),
                                          (64, 32, 8, 132), (1, 7, 7, 170), (2, 64, 4, 108)])
def test_decode_plan(rng, n, hq, hkv, sms):
    for max_keys, window in ((576, 0), (2048, 0), (5000, 512), (1, 0), (7, 16), (int(rng.integers(1, 40000)), 0)):
        plan = decode_splits(n, hq, hkv, max_keys, window, sms)
        g = hq // hkv
        assert plan.group * plan.tiles >= g and plan.group <= 8 and plan.group * (plan.tiles - 1) < g
        blocks = n * hkv * plan.tiles
        visible = min(max_keys, window) if window else max_keys
        if visible >= DECODE_MIN_KEYS * plan.max_splits:  # keys enough: at least 2 blocks per SM
            assert blocks * plan.grid >= DECODE_BLOCKS_PER_SM * sms
        for n_vis in {0, 1, visible, *rng.integers(0, visible + 1, 200).tolist()}:
            r = ranges(n_vis, plan.max_splits)
            assert len(r) <= plan.grid, (n_vis, plan)
            full = [(a, e) for a, e in r if e > a]  # empty ranges (e <= a) may close the list
            if full:  # back to back from key 0
                assert [a for a, _ in full] == [0] + [e for _, e in full[:-1]]
            assert (full[-1][1] if full else 0) == n_vis
            # about DECODE_MIN_KEYS keys or more per range (ceil(n_vis / it) ranges at most)
            assert all(e - a >= min(n_vis, DECODE_MIN_KEYS // 2) for a, e in r if e < n_vis)
