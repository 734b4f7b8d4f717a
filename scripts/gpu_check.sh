#!/usr/bin/env bash
# The GPU check of issue 9: every notebook in FAST mode, every benchmark and the on-device tests,
# all on CUDA in bfloat16. Prints a summary; exits non-zero if anything failed.
#
#   scripts/gpu_check.sh            # from the repository root, with the project's venv built
#   PYTHON=python3 DEVICE=cuda:1 DTYPE=float16 scripts/gpu_check.sh
#
# About 5 to 8 minutes on one H200. Executed notebooks go to outputs/gpu_check/.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
export HF_HUB_OFFLINE=1

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device is visible to $PYTHON (torch $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)); run it on a GPU machine" >&2
    exit 2
fi
"$PYTHON" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(), 'torch', torch.__version__)"

declare -a summary
failed=0
step() {  # step NAME COMMAND...: run, time and record one step
    local name=$1; shift
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@"; then
        summary+=("ok     $((SECONDS - start))s  $name")
    else
        summary+=("FAILED $((SECONDS - start))s  $name")
        failed=1
    fi
}

for notebook in notebooks/[0-9][0-9]_*.ipynb; do
    step "$(basename "$notebook")" "$PYTHON" -m shortlab.run_notebooks "$notebook" \
        -p FAST True -p DEVICE "$DEVICE" -p DTYPE "$DTYPE" --output-dir outputs/gpu_check
done
step "bench/run_all.py" "$PYTHON" bench/run_all.py --device "$DEVICE" --dtype "$DTYPE"
step "pytest on $DEVICE" env SHORTLAB_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_devices.py

echo "=== summary ($DEVICE, $DTYPE)"
printf '%s\n' "${summary[@]}"
exit $failed
