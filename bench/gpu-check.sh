#!/usr/bin/env bash
# GPU check for the lent GPU machine: nothing from the network. Installs the carried gguf wheel and
# the project (editable), then runs each stage below, logs to $OUT (or ./gpu-check-logs) and prints
# a short table last. Add a stage = add one line to STAGES ("name|command").
#   bash bench/gpu-check.sh            all stages
#   bash bench/gpu-check.sh tests      stages whose name contains "tests"
#   bash bench/gpu-check.sh kernel decode   stages whose name contains any of the words
set -u
cd "$(dirname "$0")/.."
LOG="${OUT:-$PWD/gpu-check-logs}"  # the device tool returns at most 8 files: one log + bench tables
STAGE_LOGS=$(mktemp -d)
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
export Q4K_CACHE="${Q4K_CACHE:-/tmp/models}"  # where the real models are (tests/realmodels.py)

# cuda-bindings (and cuda-pathfinder): the driver API for programmatic dependent launch (kernels/build.py),
# carried as wheels where the machine lacks it: pip download --no-deps --python-version 3.12
# --only-binary=:all: --platform manylinux_2_28_x86_64 "cuda-bindings==13.0.*" cuda-pathfinder
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/gguf-*.whl \
  $(python3 -c 'import cuda.bindings.driver' 2>/dev/null || ls .whl/cuda_*.whl 2>/dev/null) \
  >"$LOG/setup.log" 2>&1 || { echo "wheel install failed (carry .whl)"; cat "$LOG/setup.log"; exit 2; }
export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG/setup.log" 2>&1 \
  || { echo "editable install failed"; cat "$LOG/setup.log"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG/setup.log" 2>&1

STAGES=(
  "gpu-suite|python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_*_gpu.py tests/test_integrity.py tests/test_distill_example.py tests/test_distill_shards.py"
  "kernel-profile|python3 bench/profile_kernels.py --out $LOG/profile_kernels.md --raw /tmp/ncu-raw && tar -C /tmp -czf $LOG/ncu-raw.tgz ncu-raw"
  "decode-kernels|python3 bench/bench_kernels.py --parts gemv,small --out $LOG/decode_kernels.md"
  "kernel-tests|python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_gpu.py"
  "kernel-bench|python3 bench/bench_kernels.py --out $LOG/bench_kernels.md"
  "backend-tests|python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_ops_gpu.py && python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_cuda_backend_gpu.py"
  "ops-bench|python3 bench/bench_model.py ops"
  "attention-bench|python3 bench/bench_attention.py --out $LOG/attn.md"
  "model-bench|python3 bench/bench_model.py model"
  "model-profile|set -o pipefail; python3 bench/bench_model.py profile | tee $LOG/profile.md"
  "teacher-benchmark|Q4K_BENCH_MODEL=/tmp/qwen2-7b-q4km-synthetic.apr python3 -m pytest -q -p no:cacheprovider bench/test_bench_teacher.py --benchmark-only -k cuda --benchmark-columns=median,rounds --benchmark-json=$LOG/teacher-benchmark.json"
  "realmodel-tests|python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_realmodels_gpu.py"
  "cli-cuda|bash bench/cli-cuda.sh"
  "decode|python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_generate_gpu.py && python3 bench/bench_decode.py --out $LOG/decode.md"
  "integrity|python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_integrity.py && python3 bench/bench_model.py finite"
  "large-tests|python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_large_gpu.py"
  "distill-example|set -o pipefail; python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_distill_example.py && python3 examples/distill.py --teacher $Q4K_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda --student-size 100m --rows 1024 --seq-len 512 --batch 8 --report-json $LOG/distill-smollm2.json | tail -4 && python3 -c 'import sys; sys.path.insert(0, \"bench\"); import make_7b; make_7b.ensure_7b()' && python3 examples/distill.py --teacher /tmp/qwen2-7b-q4km-synthetic.apr --device cuda --student-size 100m --rows 512 --seq-len 512 --batch 8 --report-json $LOG/distill-7b.json | tail -4"
  "distill-shards|python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_distill_shards.py && set -o pipefail && python3 bench/bench_distill.py | tee $LOG/distill.md"
  "ray|set -o pipefail && python3 bench/bench_ray.py | tee $LOG/ray.md"
  "llama-bench|python3 bench/llama_bench.py --compare --out $LOG/llama-vs-engine.md"
  "fp8-tests|python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_fp8_gpu.py"
  "fp8-bench|python3 bench/bench_fp8.py --out $LOG/fp8.md"
  "passes-bench|python3 bench/bench_passes.py"
  "fp8-profile|set -o pipefail; python3 bench/bench_model.py profile --precision fp8 | tee $LOG/profile-fp8.md"
)
# gpu-suite runs every file with GPU tests in one pytest call (the stages below run them one by one, beside
# their benches): `bash bench/gpu-check.sh gpu-suite` is the whole GPU suite.
# Run only when named (bash bench/gpu-check.sh large-72b): each writes a 20-47 GB GGUF to /tmp first
# (minutes) and removes it at the end; the two do not fit on a 64 GB disk together.
OPTIONAL=(
  "large-72b|python3 bench/bench_large.py --shape qwen2-72b --remove --llama-bench --example-steps 20 --out $LOG/large-72b.md"
  "large-32b|python3 bench/bench_large.py --shape qwen2-32b --remove --llama-bench --out $LOG/large-32b.md"
)
for stage in "${OPTIONAL[@]}"; do
  for f in "$@"; do [[ "${stage%%|*}" == "$f" ]] && STAGES+=("$stage"); done
done

declare -a SUMMARY
status=0
for stage in "${STAGES[@]}"; do
  name="${stage%%|*}"; cmd="${stage#*|}"
  if (( $# )); then
    hit=0; for f in "$@"; do [[ "$name" == *"$f"* ]] && hit=1; done
    (( hit )) || continue
  fi
  echo "=== $name: $cmd"
  start=$(date +%s)
  set -o pipefail
  bash -c "$cmd" 2>&1 | tee "$STAGE_LOGS/$name.log"
  rc=$?
  set +o pipefail
  [[ $rc -ne 0 ]] && status=1
  { echo "=== $name (rc=$rc): $cmd"; cat "$STAGE_LOGS/$name.log"; } >>"$LOG/gpu-check.log"
  last=$(grep -E "passed|failed|error|TB/s" "$STAGE_LOGS/$name.log" | tail -1 | cut -c1-90)
  SUMMARY+=("$(printf '%-16s rc=%-3s %5ss  %s' "$name" "$rc" "$(( $(date +%s) - start ))" "$last")")
done

echo
echo "=== gpu-check summary: $(tail -1 "$LOG/setup.log")"
printf '%s\n' "${SUMMARY[@]}"
[[ -f "$LOG/bench_kernels.md" ]] && cat "$LOG/bench_kernels.md"
exit $status
