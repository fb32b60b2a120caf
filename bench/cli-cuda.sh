#!/usr/bin/env bash
# `q4k-engine logits --device cuda` end to end on the real models (when present in $Q4K_CACHE,
# default /tmp/models) and on the 7B synthetic (written to /tmp if missing): prints the top-5 of the
# last position and, on stderr, the upload report, tokens/s and the engine's peak memory.
set -eu -o pipefail
MODELS="${Q4K_CACHE:-/tmp/models}"
SEVEN_B=/tmp/qwen2-7b-q4km-synthetic.apr
TEXT="The quick brown fox jumps over the lazy dog, and then it runs into the forest to hide."
for f in "$MODELS/gemma-3-270m-q4_k_m.gguf" "$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"; do
  if [[ -f "$f" ]]; then
    echo "--- $f"
    q4k-engine logits --model "$f" --device cuda --text "$TEXT" --positions last
  else
    echo "--- $f: missing (carry the real models to run this)"; exit 1
  fi
done
[[ -f "$SEVEN_B" ]] || python3 bench/make_7b.py "$SEVEN_B"
echo "--- $SEVEN_B, 4 x 512 random tokens, all positions, fp16 logits to .npy"
python3 - <<'PY' >/tmp/tokens.jsonl
import json, random
random.seed(0)
for _ in range(4):
    print(json.dumps({"input_ids": [random.randrange(152064) for _ in range(512)]}))
PY
q4k-engine logits --model "$SEVEN_B" --device cuda --input /tmp/tokens.jsonl --dtype float16 --out /tmp/logits7b.npy
python3 -c "import numpy as np; x = np.load('/tmp/logits7b.npy'); print('logits', x.shape, x.dtype, 'finite', bool(np.isfinite(x).all()))"
