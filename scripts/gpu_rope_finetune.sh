#!/usr/bin/env bash
# Issue 12 items 1 and 3 on one GPU: fine-tune SmolLM2-135M with RoPE bases 500, 2000, 5000 and
# its own (control), measure perplexity by position and passkey by distance, and the shipped
# model's passkey around its bound. Writes $OUT/smollm2-135m.json and $OUT/rope_finetune.log.
#
#   scripts/gpu_rope_finetune.sh SmolLM2-135M-Instruct.Q4_1.gguf wiki.txt [extra script options]
#
# wiki.txt: `.venv/bin/python scripts/rope_finetune.py --export-text wiki.txt` on a machine with
# the embedded text. Needs the `gguf` package (transformers reads the .gguf with it).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 MODEL.gguf TEXT.txt [extra scripts/rope_finetune.py options]" >&2
    exit 2
fi
gguf=$1 text=$2
shift 2
: "${OUT:?set OUT to the folder that receives the results}"
for file in "$gguf" "$text"; do
    [ -f "$file" ] || { echo "no such file: $file" >&2; exit 2; }
done
python3 -c "import gguf" 2>/dev/null || { echo "the gguf package is missing: pip install its wheel first" >&2; exit 2; }
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SHORTLAB_CACHE=${SHORTLAB_CACHE:-/tmp/shortlab_cache}  # the GGUF's safetensors copy
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee "$OUT/rope_finetune.log"
# --max-minutes 5.5: no new stage starts after 5.5 min; the JSON then holds the finished bases
# ("complete": false) and a rerun with the same options continues.
python3 scripts/rope_finetune.py --model "$gguf" --text-file "$text" --device cuda --dtype bfloat16 \
    --bases own,500,2000,5000 --steps 250 --batch-size 8 --context 1024 --eval-batch-size 20 \
    --max-minutes 5.5 \
    --output "$OUT/smollm2-135m.json" "$@" 2>&1 | tee -a "$OUT/rope_finetune.log"
