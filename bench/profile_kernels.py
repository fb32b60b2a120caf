"""Nsight Compute profile of the 7B's weight products at decode's and prefill's M: what bounds them.

Each case (a product of the Qwen2-7B-shaped matrices, random k-quant weights, through the default
dispatch: the GEMV or mmv at M = 1, mmv at 8 tokens, the fused GEMM at 128, cuBLAS at 2048) runs in its own
process under `ncu` (caches flushed before every kernel replay, clocks left as they are), and the
table gives, per kernel it launched: time, DRAM bytes read and throughput, achieved and theoretical
occupancy, registers, issue slots used, tensor-pipe use and the leading warp stall reasons (cycles a
warp spent stalled per instruction issued, by reason).

    python bench/profile_kernels.py [--cases NAME,...] [--out TABLE.md] [--raw DIR]

Needs `ncu` (Nsight Compute) on PATH or in /usr/local/cuda/bin, and counter access for the user.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from q4k_engine.binio import atomic_output

# name: (type, rows, cols, M, kind) -- kind "matmul" or "glu" (the gate/up pair and its activation)
CASES = {
    "m1-qkv-q4k": ("Q4_K", 4608, 3584, 1, "matmul"),
    "m1-gateup-q4k": ("Q4_K", 18944, 3584, 1, "glu"),
    "m1-down-q4k": ("Q4_K", 3584, 18944, 1, "matmul"),
    "m1-down-q6k": ("Q6_K", 3584, 18944, 1, "matmul"),
    "m1-head-q6k": ("Q6_K", 152064, 3584, 1, "matmul"),
    "m8-qkv-q4k": ("Q4_K", 4608, 3584, 8, "matmul"),
    "m8-gateup-q4k": ("Q4_K", 18944, 3584, 8, "glu"),
    "m8-down-q4k": ("Q4_K", 3584, 18944, 8, "matmul"),
    "m8-down-q6k": ("Q6_K", 3584, 18944, 8, "matmul"),
    "m8-head-q6k": ("Q6_K", 152064, 3584, 8, "matmul"),
    "m128-gateup-q4k": ("Q4_K", 18944, 3584, 128, "glu"),
    "m128-down-q4k": ("Q4_K", 3584, 18944, 128, "matmul"),
    "m2048-gateup-q4k": ("Q4_K", 18944, 3584, 2048, "glu"),
    "m2048-down-q4k": ("Q4_K", 3584, 18944, 2048, "matmul"),
}
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats",
            "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis")
METRICS = ("dram__bytes_read.sum", "lts__t_bytes.sum", "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
           "smsp__inst_executed.sum")
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")  # WarpStateStats


def run_case(name: str) -> None:
    """Inside ncu: build the case's weights, warm up outside the profiled range, profile one call."""
    import cupy as cp

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_kernels import random_qweight

    from q4k_engine.dtypes import GGMLType
    from q4k_engine.kernels.matmul import glu_matmul, matmul

    dt, rows, cols, m, kind = CASES[name]
    dtype = GGMLType[dt]
    ws = [random_qweight(dtype, rows, cols) for _ in range(2 if kind == "glu" else 1)]
    x = cp.random.standard_normal((m, cols), dtype=cp.float32) * 0.01
    y = cp.empty((m, rows), cp.float32)

    def call():
        if kind == "glu":
            glu_matmul(x, ws[0], ws[1], "silu")
        else:
            matmul(x, ws[0], out=y)

    import cupyx.profiler

    for _ in range(3):
        call()
    cp.cuda.Device().synchronize()
    with cupyx.profiler.profile():
        call()
        cp.cuda.Device().synchronize()


def refuse(message: str) -> None:
    """Bad input or a missing tool: one line on stderr, exit 2, before any work."""
    print(f"profile_kernels: {message}", file=sys.stderr)
    sys.exit(2)


def ncu_path() -> str:
    found = shutil.which("ncu") or ("/usr/local/cuda/bin/ncu" if os.path.exists("/usr/local/cuda/bin/ncu") else None)
    if not found:
        refuse("ncu (Nsight Compute) not found on PATH or in /usr/local/cuda/bin")
    return found


def profile(name: str, raw_dir: str | None) -> list[dict]:
    """Run one case under ncu; its kernels' raw metrics as dicts (ncu's raw CSV page)."""
    ncu = ncu_path()
    with tempfile.TemporaryDirectory() as tmp:
        rep = os.path.join(tmp, name)
        cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--cache-control", "all",
               "--target-processes", "all", "-f", "-o", rep]
        for s in SECTIONS:
            cmd += ["--section", s]
        cmd += ["--metrics", ",".join(METRICS), sys.executable, os.path.abspath(__file__), "--case", name]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or not os.path.exists(rep + ".ncu-rep"):
            sys.exit(f"profile_kernels: ncu failed on case {name} (rc {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        text = subprocess.run([ncu, "--import", rep + ".ncu-rep", "--csv", "--page", "raw"],
                              capture_output=True, text=True, check=True).stdout
    if raw_dir:
        os.makedirs(raw_dir, exist_ok=True)
        with atomic_output(Path(raw_dir) / f"{name}.csv") as tmp:
            tmp.write_text(text)
    return parse_raw(text)


def parse_raw(text: str) -> list[dict]:
    """ncu's raw CSV page (a row of metric names, a row of their units, a row a kernel) as one dict a
    kernel, its units under "__units"."""
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 2:
        raise ValueError("ncu raw CSV: no header and units rows")
    header, units, body = rows[0], rows[1], rows[2:]
    return [dict(zip(header, r)) | {"__units": dict(zip(header, units))} for r in body]


def num(k: dict, key: str) -> float:
    """A metric as a float in base units (ncu's raw page prints its own units row)."""
    v = k.get(key, "")
    if v in ("", "n/a"):
        return float("nan")
    x = float(v.replace(",", ""))
    unit = k["__units"].get(key, "")
    factor = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0,
              "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12}.get(unit, 1.0)
    return x * factor


def summarize(name: str, kernels: list[dict]) -> list[dict]:
    out = []
    for k in kernels:
        t = num(k, "gpu__time_duration.sum")
        dram = num(k, "dram__bytes_read.sum")
        stalls = []
        for key in k:
            mt = STALL.match(key)
            if mt:
                v = num(k, key)
                if v == v:
                    stalls.append((v, mt.group(1)))
        stalls.sort(reverse=True)
        total = sum(v for v, _ in stalls)
        out.append({
            "case": name,
            "kernel": k.get("Kernel Name", "?")[:40],
            "us": t * 1e6,
            "dram_MB": dram / 1e6,
            "dram_TBps": dram / t / 1e12 if t else float("nan"),
            "dram_pct": num(k, "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
            "occ_pct": num(k, "sm__warps_active.avg.pct_of_peak_sustained_active"),
            "occ_theor": num(k, "sm__maximum_warps_per_active_cycle_pct"),
            "regs": num(k, "launch__registers_per_thread"),
            "grid": num(k, "launch__grid_size"),
            "issue_pct": num(k, "smsp__issue_active.avg.pct_of_peak_sustained_active"),
            "tensor_pct": num(k, "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"),
            "L2_MB": num(k, "lts__t_bytes.sum") / 1e6,
            "stall_cyc": total,
            "stalls": ", ".join(f"{r} {v:.1f}" for v, r in stalls[:4]),
        })
    return out


def table(rows: list[dict]) -> str:
    cols = ["case", "kernel", "us", "dram_MB", "dram_TBps", "dram_pct", "L2_MB", "occ_pct", "occ_theor", "regs",
            "grid", "issue_pct", "tensor_pct", "stall_cyc", "stalls"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # inside ncu
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of the cases")
    ap.add_argument("--out", help="also write the table (markdown) here")
    ap.add_argument("--raw", help="keep each case's raw ncu CSV in this folder")
    args = ap.parse_args()
    if args.case:
        run_case(args.case)
        return
    names = args.cases.split(",")
    bad = [n for n in names if n not in CASES]
    if bad:
        refuse(f"unknown case(s) {', '.join(bad)}; one of {', '.join(CASES)}")
    if args.out and not Path(args.out).parent.is_dir():
        refuse(f"--out {args.out}: directory {Path(args.out).parent} does not exist")
    ncu_path()
    rows = []
    for n in names:
        got = summarize(n, profile(n, args.raw))
        print("\n".join(table(got).splitlines()[2:]), flush=True)
        rows += got
    text = ("Stall columns: cycles a warp was stalled per instruction issued, summed over reasons, and the "
            "leading four.\n\n" + table(rows))
    print(text)
    if args.out:
        with atomic_output(Path(args.out)) as tmp:
            tmp.write_text(text + "\n")


if __name__ == "__main__":
    main()
