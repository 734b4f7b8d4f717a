#!/usr/bin/env bash
# The from-scratch RoPE-bound experiment (scripts/rope_from_scratch.py) at its GPU defaults on
# one GPU, writing results.json, the pretrained weights and log.txt to $OUT. Sized for about
# 3 minutes on one H200 (~100k-parameter models: kernel-launch bound, hence JOBS processes
# sharing the GPU). The machine needs no wheel: the text comes from TEXT_FILE, written here by
#   .venv/bin/python scripts/rope_from_scratch.py --export-text results/rope_from_scratch/text.json
# Finished (base, seed) runs are saved as they end; rerunning with the same $OUT/results.json
# in place resumes.
set -euo pipefail
: "${OUT:?set OUT to the folder that receives the results}"
TEXT_FILE=${TEXT_FILE:-results/rope_from_scratch/text.json}
JOBS=${JOBS:-8}
if [[ ! -f "$TEXT_FILE" ]]; then
    echo "missing $TEXT_FILE: write it with scripts/rope_from_scratch.py --export-text $TEXT_FILE" >&2
    exit 2
fi
mkdir -p "$OUT"
{
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
    PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" python3 scripts/rope_from_scratch.py --device cuda --jobs "$JOBS" \
        --text-file "$TEXT_FILE" --output "$OUT/results.json" "$@"
} 2>&1 | tee "$OUT/log.txt"
