"""llama.cpp's `llama-bench` as the peer in our own GPU runs (issue 12 item 6, issue 16 item 3).

    python bench/llama_bench.py MODEL.gguf [--out FILE.md]      # llama-bench's pp512, pp2048, tg128
    python bench/llama_bench.py --compare [--model 7B.gguf] [--out FILE.md]
        # the same GGUF through q4k-engine and llama-bench in one run, side by side with ratios

The binary: `.whl/llama-bench` (carried, built elsewhere by bench/build_llama_bench.sh), or
`.whl/llama-bench.xz` (the same, xz-compressed to carry: ~21 MB instead of ~50) unpacked into
/tmp/llama-build, if it runs here; else one built once from `.whl/llama-cpp-python-*-stripped.tar.gz`
(bench/strip_llama_sdist.py) into /tmp/llama-build, saying so. It is linked against libcudart/libcublas/libcublasLt.so.13, which
come from the pip `nvidia-*` packages (site-packages/nvidia/*/lib, nvidia/cu13/lib) or
/usr/local/cuda/lib64: those directories are put on LD_LIBRARY_PATH when it runs.

Figures are llama-bench's own (`-o json`): mean and standard deviation of tokens/s over `reps`
repetitions after its warm-up run; ppN = one N-token prompt (logits of the last position only),
tgN = N tokens generated one at a time from an empty context. q4k-engine's (--compare), on the same
file, through the public API on the GPU: 1xN prefill = median wall time of `logits_for_batch` on one
N-token prompt (last-position fp16 logits on the device, synchronized, after a warm-up call);
decode = batch-1 greedy `generate` with EOS ignored and CUDA graphs, 1-token prompt, 1000 / median
ms per step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import lzma
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_7b, bench_model beside this file

from q4k_engine.binio import atomic_output  # noqa: E402
from q4k_engine.errors import DeviceError, InputError, Q4KError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WHL = REPO / ".whl"
BUILD_DIR = Path("/tmp/llama-build")
BUILD_SCRIPT = Path(__file__).resolve().parent / "build_llama_bench.sh"
CUDA_LIBS = ("libcudart.so", "libcublas.so", "libcublasLt.so")


@dataclass(frozen=True)
class BenchRow:
    """One llama-bench test: its name (pp512, tg128, pp512+tg128; "@ dN" with a context depth)
    and tokens/s over its repetitions."""

    test: str
    n_prompt: int
    n_gen: int
    tps_mean: float
    tps_std: float
    reps: int
    build: str  # llama.cpp commit and build number
    backend: str
    gpu: str
    flash_attn: str
    n_gpu_layers: int
    model_type: str


# --------------------------------------------------------------------------------------------
# the binary and its libraries


def cuda_lib_dirs(site_dirs: list[Path] | None = None, system: tuple[Path, ...] = (Path("/usr/local/cuda/lib64"),)
                  ) -> list[Path]:
    """The directories that hold the CUDA runtime/cuBLAS libraries llama-bench is linked against:
    every site-packages' nvidia/cu13/lib and nvidia/*/lib (pip's CUDA packages), then the system
    toolkit's; only those holding one of CUDA_LIBS (any version suffix), each once, in that order."""
    if site_dirs is None:
        site_dirs = [Path(p) for p in (*site.getsitepackages(), site.getusersitepackages(),
                                       sysconfig.get_paths()["purelib"], *sys.path) if p]
    candidates: list[Path] = []
    for sp in site_dirs:
        nv = sp / "nvidia"
        if nv.is_dir():
            candidates += [nv / "cu13" / "lib", *sorted(d / "lib" for d in nv.iterdir() if d.name != "cu13")]
    candidates += list(system)
    found: list[Path] = []
    for d in candidates:
        if d.is_dir() and d.resolve() not in {f.resolve() for f in found} and \
                any(f.name.startswith(CUDA_LIBS) for f in d.iterdir()):
            found.append(d)
    return found


def run_env(lib_dirs: list[Path], base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with lib_dirs put before its LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*map(str, lib_dirs), *filter(None, [env.get("LD_LIBRARY_PATH")])])
    return env


def probe(binary: Path, env: dict[str, str]) -> str | None:
    """None if `binary --list-devices` runs, else why not (one line). A carried binary that lost
    its execute bit gets it back (said on stderr)."""
    if not binary.is_file():
        return f"{binary}: no such file"
    if not os.access(binary, os.X_OK):
        try:
            binary.chmod(binary.stat().st_mode | 0o111)
            print(f"llama_bench: {binary} was not executable; made it so", file=sys.stderr)
        except OSError as e:
            return f"{binary}: not executable, and cannot be made so: {e.strerror or e}"
    try:
        r = subprocess.run([str(binary), "--list-devices"], env=env, capture_output=True, text=True, timeout=120)
    except OSError as e:
        return f"{binary}: cannot run: {e.strerror or e}"
    except subprocess.TimeoutExpired:
        return f"{binary} --list-devices: no answer in 120 s"
    if r.returncode:
        tail = " ".join((r.stderr or r.stdout).split())[-300:]
        return f"{binary} --list-devices: exit {r.returncode}: {tail}"
    return None


def find_binary(whl: Path = WHL, build_dir: Path = BUILD_DIR, build_script: Path = BUILD_SCRIPT,
                lib_dirs: list[Path] | None = None) -> Path:
    """A llama-bench that runs here: whl/llama-bench, else build_dir/llama-bench (unpacked from
    whl/llama-bench.xz when that is newer, or an earlier build), else one built now from
    whl/llama-cpp-python-*-stripped.tar.gz. Each step that is passed over is
    said on stderr with why; DeviceError when none runs."""
    env = run_env(cuda_lib_dirs() if lib_dirs is None else lib_dirs)
    packed, unpacked = whl / "llama-bench.xz", build_dir / "llama-bench"
    if packed.is_file() and (not unpacked.is_file() or unpacked.stat().st_mtime < packed.stat().st_mtime):
        build_dir.mkdir(parents=True, exist_ok=True)
        with lzma.open(packed) as src, atomic_output(unpacked) as tmp:
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.chmod(0o755)
        print(f"llama_bench: unpacked {packed} to {unpacked}", file=sys.stderr)
    whys = []
    for cand in (whl / "llama-bench", unpacked):
        why = probe(cand, env)
        if why is None:
            return cand
        whys.append(why)
        print(f"llama_bench: not using {why}", file=sys.stderr)
    tarballs = sorted(whl.glob("llama-cpp-python-*-stripped.tar.gz"))
    if not tarballs:
        raise DeviceError(f"no runnable llama-bench ({'; '.join(whys)}) and no {whl}/llama-cpp-python-*-stripped.tar.gz "
                          "to build one from (bench/strip_llama_sdist.py makes it)")
    print(f"llama_bench: building llama-bench from {tarballs[-1]} into {build_dir} (bench/build_llama_bench.sh; "
          "minutes)", file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "build.log", "w") as log:
        r = subprocess.run(["bash", str(build_script), str(tarballs[-1]), str(build_dir)], stdout=log,
                           stderr=subprocess.STDOUT)
    if r.returncode:
        tail = (build_dir / "build.log").read_text().splitlines()[-5:]
        raise DeviceError(f"building llama-bench failed (exit {r.returncode}; {build_dir}/build.log): {' | '.join(tail)}")
    why = probe(build_dir / "llama-bench", env)
    if why is not None:
        raise DeviceError(f"the llama-bench just built does not run: {why}")
    return build_dir / "llama-bench"


# --------------------------------------------------------------------------------------------
# running and reading it


def parse_json(text: str) -> list[BenchRow]:
    """llama-bench's `-o json` output as rows; InputError naming what is missing if it is not that."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"llama-bench output is not JSON: {e}") from None
    if not isinstance(tests, list):
        raise InputError("llama-bench output is not a JSON list of tests")
    rows = []
    for i, t in enumerate(tests):
        try:
            n_prompt, n_gen, depth = int(t["n_prompt"]), int(t["n_gen"]), int(t.get("n_depth", 0))
            name = "+".join(s for s in (f"pp{n_prompt}" * bool(n_prompt), f"tg{n_gen}" * bool(n_gen)) if s)
            fa = t["flash_attn"]  # llama_flash_attn_type (-1 auto, 0 off, 1 on); a bool in older builds
            fa = fa if isinstance(fa, str) else {-1: "auto", 0: "off", 1: "on"}[int(fa)]
            rows.append(BenchRow(
                test=name + (f" @ d{depth}" if depth else ""), n_prompt=n_prompt, n_gen=n_gen,
                tps_mean=float(t["avg_ts"]), tps_std=float(t["stddev_ts"]), reps=len(t.get("samples_ts", [])),
                build=f"{t['build_commit']} (b{t['build_number']})", backend=str(t["backends"]),
                gpu=str(t.get("gpu_info", "")), flash_attn=fa,
                n_gpu_layers=int(t["n_gpu_layers"]), model_type=str(t["model_type"])))
        except (KeyError, TypeError, ValueError) as e:  # KeyError: a field, or an unknown flash_attn code
            raise InputError(f"llama-bench output, test {i}: missing or bad field {e}") from None
    return rows


def command(binary: Path, gguf: Path, prompts: tuple[int, ...] = (512, 2048), gen: int = 128, flash_attn: bool = True,
            n_gpu_layers: int = 99, reps: int = 3) -> list[str]:
    """The llama-bench command line: prompt-only tests of each length, one generation test."""
    return [str(binary), "-m", str(gguf), "-p", ",".join(map(str, prompts)), "-n", str(gen),
            "-fa", "on" if flash_attn else "off", "-ngl", str(n_gpu_layers), "-r", str(reps), "-o", "json"]


def run(gguf: str | Path, prompts: tuple[int, ...] = (512, 2048), gen: int = 128, flash_attn: bool = True,
        n_gpu_layers: int = 99, reps: int = 3, binary: Path | None = None) -> list[BenchRow]:
    """llama-bench on `gguf`: one row per test (pp of each prompt length, tg`gen`)."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(f"{gguf}: no such model file")
    binary = binary or find_binary()
    cmd = command(binary, gguf, tuple(prompts), gen, flash_attn, n_gpu_layers, reps)
    print("llama_bench: " + " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, env=run_env(cuda_lib_dirs()), capture_output=True, text=True)
    if r.returncode:
        tail = [ln for ln in r.stderr.splitlines() if ln.strip()][-6:]
        raise DeviceError(f"llama-bench on {gguf} failed (exit {r.returncode}): {' | '.join(tail)}")
    return parse_json(r.stdout)


# --------------------------------------------------------------------------------------------
# tables


def table(rows: list[BenchRow], model: str) -> str:
    """llama-bench's rows as a Markdown table, with where they were measured."""
    if not rows:
        raise InputError("llama-bench ran no test")
    r0 = rows[0]
    head = [f"llama.cpp llama-bench {r0.build}, {r0.backend}{f' on {r0.gpu}' if r0.gpu else ''}, {datetime.date.today()}: {model} "
            f"({r0.model_type}), flash attention {r0.flash_attn}, {r0.n_gpu_layers} layers offloaded.", "",
            "| test | tokens/s | ± sd | reps |", "|---|---|---|---|"]
    return "\n".join(head + [f"| {r.test} | {r.tps_mean:,.1f} | {r.tps_std:,.1f} | {r.reps} |" for r in rows])


@dataclass(frozen=True)
class EngineFigure:
    """One q4k-engine figure beside the llama-bench test it is compared with."""

    work: str
    tokens_per_s: float
    peer_test: str  # the BenchRow.test it faces


def compare_table(engine: list[EngineFigure], rows: list[BenchRow], header: str) -> str:
    """q4k-engine's figures beside llama-bench's, with the ratio q4k-engine / llama.cpp."""
    by_test = {r.test: r for r in rows}
    lines = [header, "", "| work | q4k-engine tokens/s | llama.cpp test | llama.cpp tokens/s (± sd) | q4k-engine / llama.cpp |",
             "|---|---|---|---|---|"]
    for f in engine:
        peer = by_test.get(f.peer_test)
        if peer is None:
            lines.append(f"| {f.work} | {f.tokens_per_s:,.1f} | {f.peer_test} | not run | |")
        else:
            lines.append(f"| {f.work} | {f.tokens_per_s:,.1f} | {peer.test} | {peer.tps_mean:,.1f} (± {peer.tps_std:,.1f}) "
                         f"| {f.tokens_per_s / peer.tps_mean:.2f}x |")
    return "\n".join(lines)


def engine_figures(gguf: Path, prompts: tuple[int, ...], gen: int, reps: int = 5) -> tuple[list[EngineFigure], str]:
    """q4k-engine on the GPU on `gguf` (module docstring), and a line naming the card and the upload."""
    import numpy as np

    import q4k_engine
    from bench_model import wall_ms

    teacher = q4k_engine.load(gguf, device="cuda", output="cupy", dtype="float16")
    rng = np.random.default_rng(0)
    figs = []
    for n in prompts:
        p = rng.integers(0, teacher.vocab_size, (1, n))
        ms = wall_ms(lambda: teacher.logits_for_batch(p), reps=reps)
        figs.append(EngineFigure(f"prefill 1x{n} (last-position logits)", n / ms * 1e3, f"pp{n}"))
    p = rng.integers(0, teacher.vocab_size, (1, 1))
    teacher.generate(p, 3, ignore_eos=True)  # compile and capture batch 1
    g = teacher.generate(p, gen + 1, ignore_eos=True)
    figs.append(EngineFigure(f"decode batch 1, {gen} tokens ({g.mode}{f', {g.note}' if g.note else ''})",
                             1e3 / g.step_ms(), f"tg{gen}"))
    return figs, f"{teacher.backend.device_name}; {teacher.backend.upload}"


def write(text: str, out: Path | None) -> None:
    print(text)
    if out:
        with atomic_output(out) as tmp:
            tmp.write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, nargs="?", help="a GGUF (with --compare: default the synthetic 7B, written "
                                                        "to the temp dir if missing)")
    ap.add_argument("--compare", action="store_true", help="q4k-engine beside llama-bench on the same GGUF")
    ap.add_argument("--prompts", default="512,2048", help="prompt lengths (pp tests, 1xN prefill)")
    ap.add_argument("--gen", type=int, default=128, help="generated tokens (tg test, decode)")
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions")
    ap.add_argument("--no-fa", action="store_true", help="llama-bench without flash attention")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    a = ap.parse_args()
    try:
        prompts = tuple(int(x) for x in a.prompts.split(",") if x)
    except ValueError:
        raise SystemExit(f"llama_bench: --prompts {a.prompts!r}: not comma-separated integers") from None
    try:
        if not a.compare:
            if a.model is None:
                ap.error("MODEL.gguf is required (or --compare)")
            write(table(run(a.model, prompts, a.gen, not a.no_fa, reps=a.reps), a.model.name), a.out)
            return
        import make_7b

        path = a.model or Path(tempfile.gettempdir()) / "qwen2-7b-q4km-synthetic.gguf"
        if not path.exists():
            make_7b.write_model(path, "qwen2-7b", fmt="gguf")
        rows = run(path, prompts, a.gen, not a.no_fa, reps=a.reps)  # first: the GPU to itself
        figs, where = engine_figures(path, prompts, a.gen)
        r0 = rows[0]
        header = (f"q4k-engine vs llama.cpp on the same GGUF, {datetime.date.today()}: {path.name} "
                  f"({path.stat().st_size / 1e9:.2f} GB), {where}. llama.cpp: llama-bench {r0.build}, {r0.backend}, "
                  f"flash attention {r0.flash_attn}, all layers on the GPU, mean of {r0.reps} reps. q4k-engine: public "
                  "API, fp16 logits on the device, median of 5 synchronized calls after a warm-up (bench/llama_bench.py).")
        write(compare_table(figs, rows, header), a.out)
    except Q4KError as e:
        raise SystemExit(f"llama_bench: {e}") from None


if __name__ == "__main__":
    main()
