#!/usr/bin/env bash
# Build llama.cpp's llama-bench (the peer in our benchmarks) from a llama-cpp-python sdist, nothing
# from the network: the vendored llama.cpp, static ggml/llama, only the llama-bench target.
#
#   bash bench/build_llama_bench.sh TARBALL OUTDIR [--cpu]
#
# TARBALL: llama-cpp-python-*.tar.gz (the PyPI sdist, or the stripped one that the lead carries).
# CUDA (default): sm_90 (Hopper: llama.cpp has no 90a-only kernels; mma.sync paths, not wgmma), real
# code only (no PTX to JIT), the FlashAttention kernels for the f16 KV cache only (llama-bench's
# default). nvcc is taken from $CUDA_HOME, PATH or /usr/local/cuda; a pip-wheel toolkit
# (nvidia/cu13/{bin,include,lib}, as `pip install --target DIR nvidia-cuda-nvcc nvidia-cuda-runtime
# nvidia-cublas nvidia-cuda-cccl` lays it out) works too: the missing unversioned .so links and a
# link-time libcuda.so stub are made in the build dir (the driver's libcuda.so.1 is used at run time).
# libstdc++/libgcc are linked statically; libcudart/libcublas/libcublasLt/libcuda stay dynamic.
# --cpu: no CUDA (a check that a GGUF loads in llama.cpp on a machine without a GPU).
# Env: BUILD_DIR (default OUTDIR/build), JOBS (default nproc).
set -euo pipefail
die() { echo "build_llama_bench: $*" >&2; exit 2; }
(( $# >= 2 )) || die "usage: build_llama_bench.sh TARBALL OUTDIR [--cpu]"
TARBALL=$(realpath "$1"); OUTDIR=$(realpath -m "$2"); CPU=0
[[ "${3:-}" == "--cpu" ]] && CPU=1
[[ -n "${3:-}" && $CPU == 0 ]] && die "unknown option '$3' (only --cpu)"
[[ -f "$TARBALL" ]] || die "$TARBALL: no such file"
BUILD_DIR=$(realpath -m "${BUILD_DIR:-$OUTDIR/build}")
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUTDIR" "$BUILD_DIR"
t0=$(date +%s)

SRC="$BUILD_DIR/src"
if [[ ! -f "$SRC/.unpacked" ]]; then
  rm -rf "$SRC"; mkdir -p "$SRC"
  tar -xzf "$TARBALL" -C "$SRC" --strip-components=1
  touch "$SRC/.unpacked"
fi
LLAMA="$SRC/vendor/llama.cpp"
[[ -f "$LLAMA/tools/llama-bench/llama-bench.cpp" ]] || die "$TARBALL: no vendor/llama.cpp/tools/llama-bench in it"

# The sdist has no git history: llama-bench's build_commit is the llama.cpp commit that the
# sdist's changelog names last, and the build number its llama-cpp-python version's digits.
COMMIT=$(grep -m1 -oE 'llama\.cpp@[0-9a-f]{7,40}' "$SRC/CHANGELOG.md" 2>/dev/null | cut -d@ -f2 || true)
PYVER=$(sed -nE 's/^Version: *//p' "$SRC/PKG-INFO" 2>/dev/null | head -1)
[[ -n "$COMMIT" ]] || echo "build_llama_bench: $SRC/CHANGELOG.md names no llama.cpp commit; build_commit will read 'unknown'"
ARGS=(
  -DLLAMA_BUILD_COMMIT="${COMMIT:-unknown}" -DLLAMA_BUILD_NUMBER="$(tr -cd 0-9 <<<"${PYVER:-0}")"
  -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
  # portable CPU code (the binary is built on one machine and run on another): AVX2, no -march=native
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
  -DGGML_OPENMP=OFF  # ggml's own thread pool: no libgomp needed where it runs
  "-DCMAKE_EXE_LINKER_FLAGS=-static-libstdc++ -static-libgcc"
  -DCMAKE_SKIP_BUILD_RPATH=ON  # no path of this machine in the binary: CUDA libs come from LD_LIBRARY_PATH
)
if (( CPU )); then
  ARGS+=(-DGGML_CUDA=OFF)
else
  NVCC=""
  for c in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
    [[ -n "$c" && -x "$c" ]] && { NVCC=$(realpath "$c"); break; }
  done
  [[ -n "$NVCC" ]] || die "no nvcc (set CUDA_HOME, put nvcc on PATH, or install /usr/local/cuda); --cpu builds without CUDA"
  ROOT=$(dirname "$(dirname "$NVCC")")
  LIBDIR=""
  for d in "$ROOT/lib64" "$ROOT/lib" "$ROOT/targets/x86_64-linux/lib"; do
    [[ -e "$d/libcudart.so" || -e "$d/libcudart.so.13" || -e "$d/libcudart.so.12" ]] && { LIBDIR=$d; break; }
  done
  [[ -n "$LIBDIR" ]] || die "$ROOT: no libcudart.so* beside nvcc"
  # FindCUDAToolkit wants unversioned libcudart/libcublas/libcublasLt and a libcuda.so (the toolkit's
  # stub) to link against; a pip-wheel toolkit has only the versioned ones and no stub.
  SHIM="$BUILD_DIR/cuda-link"
  rm -rf "$SHIM"; mkdir -p "$SHIM"
  for lib in cudart cublas cublasLt; do
    f=$(ls "$LIBDIR"/lib$lib.so "$LIBDIR"/lib$lib.so.[0-9]* 2>/dev/null | head -1 || true)
    [[ -n "$f" ]] || die "$LIBDIR: no lib$lib.so*"
    ln -s "$f" "$SHIM/lib$lib.so"
  done
  STUB=""
  for s in "$LIBDIR/stubs/libcuda.so" "$ROOT/lib64/stubs/libcuda.so" "$ROOT/targets/x86_64-linux/lib/stubs/libcuda.so"; do
    [[ -f "$s" ]] && { STUB=$s; break; }
  done
  if [[ -n "$STUB" ]]; then
    ln -s "$STUB" "$SHIM/libcuda.so"
  else
    # Every driver entry point that cuda.h declares (after its _v2/_v3 renames), as empty functions
    # under the driver's soname: link time only.
    echo "build_llama_bench: no libcuda.so stub in $ROOT; making one from cuda.h for linking"
    gcc -E -P -x c "$ROOT/include/cuda.h" -I"$ROOT/include" \
      | grep -oE '\bCUresult\s+(CUDAAPI\s+)?cu[A-Za-z0-9_]+\s*\(' \
      | sed -E 's/.*\b(cu[A-Za-z0-9_]+)\s*\(/\1/' | sort -u \
      | sed 's/.*/void &(void) {}/' >"$SHIM/cuda_stub.c"
    [[ -s "$SHIM/cuda_stub.c" ]] || die "$ROOT/include/cuda.h: no driver functions found"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$SHIM/libcuda.so" "$SHIM/cuda_stub.c"
  fi
  if [[ ! -d "$ROOT/lib64" && ! -d "$ROOT/targets" ]]; then
    # pip-wheel layout: nvcc.profile links from $TOP/lib64, the wheels ship lib/. A view of the
    # toolkit with lib64 -> the link dir; nvcc itself is hard-linked (or copied) because it finds
    # its profile and tools beside its own path.
    VIEW="$BUILD_DIR/cuda-toolkit"
    rm -rf "$VIEW"; mkdir -p "$VIEW/bin"
    for f in "$ROOT"/*; do [[ "$(basename "$f")" == bin ]] || ln -s "$f" "$VIEW/"; done
    for f in "$ROOT"/bin/*; do [[ "$(basename "$f")" == nvcc ]] || ln -s "$f" "$VIEW/bin/"; done
    cp -l "$NVCC" "$VIEW/bin/nvcc" 2>/dev/null || cp "$NVCC" "$VIEW/bin/nvcc"
    for f in "$LIBDIR"/*; do ln -sf "$f" "$SHIM/"; done
    ln -s "$SHIM" "$VIEW/lib64"
    echo "build_llama_bench: pip-wheel CUDA toolkit; using the view $VIEW"
    ROOT=$VIEW; NVCC=$VIEW/bin/nvcc
  fi
  NVCC_VER=$("$NVCC" --version | grep -oE 'release [0-9.]+' | cut -d' ' -f2)
  echo "build_llama_bench: nvcc $NVCC ($NVCC_VER), CUDA libs $LIBDIR"
  ARGS+=(
    -DGGML_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC" -DCUDAToolkit_ROOT="$ROOT"
    -DCUDA_CUDART="$SHIM/libcudart.so" -DCUDA_cudart_LIBRARY="$SHIM/libcudart.so"
    -DCUDA_cublas_LIBRARY="$SHIM/libcublas.so" -DCUDA_cublasLt_LIBRARY="$SHIM/libcublasLt.so"
    -DCUDA_cuda_driver_LIBRARY="$SHIM/libcuda.so"
    -DCMAKE_CUDA_ARCHITECTURES=90-real "-DGGML_CUDA_FA_QUANTS=f16-f16" -DGGML_CUDA_NCCL=OFF
  )
fi

cmake -S "$LLAMA" -B "$BUILD_DIR/cmake" "${ARGS[@]}" >"$BUILD_DIR/configure.log" 2>&1 \
  || { tail -40 "$BUILD_DIR/configure.log"; die "cmake configure failed (log: $BUILD_DIR/configure.log)"; }
cmake --build "$BUILD_DIR/cmake" --target llama-bench -j "$JOBS"
cp "$BUILD_DIR/cmake/bin/llama-bench" "$OUTDIR/llama-bench.tmp"
strip "$OUTDIR/llama-bench.tmp"
mv "$OUTDIR/llama-bench.tmp" "$OUTDIR/llama-bench"
echo "build_llama_bench: $OUTDIR/llama-bench ($(du -h "$OUTDIR/llama-bench" | cut -f1), $(( $(date +%s) - t0 )) s, $( ((CPU)) && echo CPU || echo "CUDA sm_90"))"
