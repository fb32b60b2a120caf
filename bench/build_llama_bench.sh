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
# libstdc++/libgcc are linked statically; libcudart/libcublas/libcublasLt/libcuda stay dynamic; glibc
# stays dynamic too, so the binary needs the build machine's glibc or newer (Debian 12's: 2.36).
# To carry it (bench/llama_bench.py): `xz -6 -k OUTDIR/llama-bench` -> .whl/llama-bench.xz.
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
# sdist's changelog names last.
COMMIT=$(grep -m1 -oE 'llama\.cpp@[0-9a-f]{7,40}' "$SRC/CHANGELOG.md" 2>/dev/null | cut -d@ -f2 || true)
[[ -n "$COMMIT" ]] || echo "build_llama_bench: $SRC/CHANGELOG.md names no llama.cpp commit; build_commit will read 'unknown'"
ARGS=(
  -DLLAMA_BUILD_COMMIT="${COMMIT:-unknown}"
  -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
  # portable CPU code (the binary is built on one machine and run on another): AVX2, no -march=native
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
  -DGGML_CCACHE=OFF -DGGML_OPENMP=OFF  # ggml's own thread pool: no libgomp needed where it runs
  "-DCMAKE_EXE_LINKER_FLAGS=-static-libstdc++ -static-libgcc"
  -DCMAKE_SKIP_BUILD_RPATH=ON  # no path of this machine in the binary: CUDA libs come from LD_LIBRARY_PATH
)
if (( CPU )); then
  ARGS+=(-DGGML_CUDA=OFF)
else
  NVCC=""
  for c in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
    [[ -n "$c" && -x "$c" ]] && { NVCC=$c; break; }
  done
  [[ -n "$NVCC" ]] || die "no nvcc (set CUDA_HOME, put nvcc on PATH, or install /usr/local/cuda); --cpu builds without CUDA"
  # the real nvcc (the one on PATH may be a wrapper script): where nvcc itself says it is
  HERE=$(cd /tmp && "$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)
  [[ -x "$HERE/nvcc" ]] || die "$NVCC: cannot tell where its toolkit is (nvcc --dryrun names no _HERE_)"
  NVCC=$(realpath "$HERE/nvcc")
  ROOT=$(dirname "$(dirname "$NVCC")")
  # The pieces may be spread out: a toolkit without cuBLAS (/usr/local/cuda with cuBLAS from pip),
  # a pip-wheel toolkit (nvidia/cu13/{bin,include,lib}: no lib64, which nvcc.profile links from,
  # no unversioned .so, no libcuda.so stub). So nvcc runs from a view of the toolkit in the build
  # dir (nvcc is hard-linked or copied there: it finds its profile, headers and libs from its own
  # path) whose include/ and lib64/ gather the toolkit's and, for what it lacks, those of the pip
  # nvidia packages of python3 (or of $CUDA_EXTRA, dirs with include/ and lib/).
  EXTRA=(${CUDA_EXTRA:-})
  if command -v python3 >/dev/null; then
    while read -r sp; do [[ -d "$sp/nvidia" ]] && EXTRA+=("$sp"/nvidia/cu13 "$sp"/nvidia/*); done \
      < <(python3 -c 'import site, sys; print("\n".join([*site.getsitepackages(), *sys.path[1:]]))' 2>/dev/null)
  fi
  VIEW="$BUILD_DIR/cuda-toolkit"
  rm -rf "$VIEW"; mkdir -p "$VIEW/bin" "$VIEW/include" "$VIEW/lib64"
  for f in "$ROOT"/bin/*; do [[ "$(basename "$f")" == nvcc ]] || ln -s "$f" "$VIEW/bin/"; done
  cp -l "$NVCC" "$VIEW/bin/nvcc" 2>/dev/null || cp "$NVCC" "$VIEW/bin/nvcc"
  ln -s "$ROOT/nvvm" "$VIEW/nvvm"
  ln -s lib64 "$VIEW/lib"
  for d in "$ROOT/include" "$ROOT/targets/x86_64-linux/include" "${EXTRA[@]/%//include}"; do
    [[ -d "$d" ]] || continue
    for f in "$d"/*; do [[ -e "$VIEW/include/$(basename "$f")" ]] || ln -s "$f" "$VIEW/include/"; done
  done
  for d in "$ROOT/lib64" "$ROOT/lib" "$ROOT/targets/x86_64-linux/lib" "${EXTRA[@]/%//lib}"; do
    [[ -d "$d" ]] || continue
    for f in "$d"/*; do [[ -e "$VIEW/lib64/$(basename "$f")" ]] || ln -s "$(realpath "$f")" "$VIEW/lib64/$(basename "$f")"; done
  done
  for lib in cudart cublas cublasLt; do
    [[ -e "$VIEW/lib64/lib$lib.so" ]] && continue
    f=$(ls "$VIEW"/lib64/lib$lib.so.[0-9]* 2>/dev/null | head -1 || true)
    [[ -n "$f" ]] || die "no lib$lib.so* in $ROOT nor in ${EXTRA[*]:-any pip nvidia package} (pip install nvidia-cublas, or set CUDA_EXTRA)"
    ln -s "$(basename "$f")" "$VIEW/lib64/lib$lib.so"
  done
  for h in cuda_runtime.h cuda.h cublas_v2.h; do
    [[ -e "$VIEW/include/$h" ]] || die "no $h in $ROOT nor in ${EXTRA[*]:-any pip nvidia package}"
  done
  STUB=""
  for s in "$ROOT/lib64/stubs/libcuda.so" "$ROOT/lib/stubs/libcuda.so" "$ROOT/targets/x86_64-linux/lib/stubs/libcuda.so"; do
    [[ -f "$s" ]] && { STUB=$s; break; }
  done
  rm -rf "$VIEW/lib64/stubs"; mkdir -p "$VIEW/lib64/stubs"
  if [[ -n "$STUB" ]]; then
    ln -s "$STUB" "$VIEW/lib64/stubs/libcuda.so"
  else
    # Every driver entry point that cuda.h declares (after its _v2/_v3 renames), as empty functions
    # under the driver's soname: for linking only (the driver's libcuda.so.1 is used at run time).
    echo "build_llama_bench: no libcuda.so stub in $ROOT; making one from cuda.h for linking"
    gcc -E -P -x c "$VIEW/include/cuda.h" -I"$VIEW/include" \
      | grep -oE '\bCUresult\s+(CUDAAPI\s+)?cu[A-Za-z0-9_]+\s*\(' \
      | sed -E 's/.*\b(cu[A-Za-z0-9_]+)\s*\(/\1/' | sort -u \
      | sed 's/.*/void &(void) {}/' >"$BUILD_DIR/cuda_stub.c"
    [[ -s "$BUILD_DIR/cuda_stub.c" ]] || die "$VIEW/include/cuda.h: no driver functions found"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$VIEW/lib64/stubs/libcuda.so" "$BUILD_DIR/cuda_stub.c"
  fi
  NVCC=$VIEW/bin/nvcc
  echo "build_llama_bench: nvcc $(realpath "$NVCC") ($("$NVCC" --version | grep -oE 'release [0-9.]+')), toolkit view $VIEW"
  L=$VIEW/lib64
  ARGS+=(
    -DGGML_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC" -DCUDAToolkit_ROOT="$VIEW"
    -DCUDA_CUDART="$L/libcudart.so" -DCUDA_cudart_LIBRARY="$L/libcudart.so"
    -DCUDA_cublas_LIBRARY="$L/libcublas.so" -DCUDA_cublasLt_LIBRARY="$L/libcublasLt.so"
    -DCUDA_cuda_driver_LIBRARY="$L/stubs/libcuda.so"
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
