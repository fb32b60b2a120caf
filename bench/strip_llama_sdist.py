"""Cut the llama-cpp-python sdist down to what bench/build_llama_bench.sh needs to build llama-bench
(CPU and CUDA), so that it can be carried to a GPU machine without network (≤ 64 MiB a transfer).

    python bench/strip_llama_sdist.py llama_cpp_python-0.3.36.tar.gz OUTDIR
    -> OUTDIR/llama-cpp-python-0.3.36-stripped.tar.gz

Kept: the vendored llama.cpp's CMake files, include/, src/, common/, ggml/ with its CPU and CUDA
backends (and the CMake stubs of the backends built from CUDA sources), tools/llama-bench, the vendored
libraries that common/ links, the licenses, and the sdist's PKG-INFO/CHANGELOG (its version and the
llama.cpp commit it vendors). Dropped: models, docs, tests, examples, the Python bindings, the other
tools and backends. `add_subdirectory` lines that name a dropped directory are taken out of the CMake
files, so that configuring the rest still works.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from q4k_engine.binio import atomic_output

LLAMA = "vendor/llama.cpp"
KEEP_TOP = {"CHANGELOG.md", "LICENSE.md", "PKG-INFO", "vendor"}
KEEP_LLAMA = {"CMakeLists.txt", "LICENSE", "cmake", "common", "ggml", "include", "licenses", "src", "tools",
              "vendor"}
KEEP_TOOLS = {"CMakeLists.txt", "llama-bench"}
KEEP_VENDOR = {"CMakeLists.txt", "cpp-httplib", "nlohmann", "sheredom"}  # what common/ links
# ggml-hip and ggml-musa compile ggml-cuda's sources; their CMake files are a few KB, kept.
KEEP_BACKENDS = {"ggml-cpu", "ggml-cuda", "ggml-hip", "ggml-musa"}
SUBDIR = re.compile(r"^\s*add_subdirectory\(\s*([^\s)$]+)[^)]*\)\s*$")


def strip_tree(root: Path) -> None:
    """Delete what llama-bench's build does not use, in place (root = the unpacked sdist)."""
    llama = root / LLAMA
    if not (llama / "tools" / "llama-bench" / "llama-bench.cpp").is_file():
        sys.exit(f"strip_llama_sdist: {root}: no {LLAMA}/tools/llama-bench/llama-bench.cpp (not a llama-cpp-python sdist?)")
    for keep, where in ((KEEP_TOP, root), (KEEP_LLAMA, llama), (KEEP_TOOLS, llama / "tools"),
                        (KEEP_VENDOR, llama / "vendor")):
        for p in where.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in (llama / "ggml" / "src").iterdir():
        if p.is_dir() and p.name.startswith("ggml-") and p.name not in KEEP_BACKENDS:
            shutil.rmtree(p)
    for cml in root.rglob("CMakeLists.txt"):
        lines = cml.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if not ((m := SUBDIR.match(ln)) and not (cml.parent / m.group(1)).is_dir())]
        if len(kept) != len(lines):
            cml.write_text("".join(kept))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sdist", type=Path, help="llama_cpp_python-X.tar.gz from PyPI")
    ap.add_argument("outdir", type=Path)
    a = ap.parse_args()
    m = re.match(r"llama[_-]cpp[_-]python-(.+)\.tar\.gz$", a.sdist.name)
    if not m or not a.sdist.is_file():
        sys.exit(f"strip_llama_sdist: {a.sdist}: not a llama-cpp-python sdist file (llama_cpp_python-X.tar.gz)")
    name = f"llama-cpp-python-{m.group(1)}-stripped"
    a.outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.outdir) as tmp:
        with tarfile.open(a.sdist) as tf:
            tf.extractall(tmp, filter="data")
        (top,) = Path(tmp).iterdir()
        strip_tree(top)
        out = a.outdir / f"{name}.tar.gz"
        with atomic_output(out) as part, tarfile.open(part, "w:gz", compresslevel=9) as tf:
            tf.add(top, arcname=name)
    print(f"strip_llama_sdist: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
