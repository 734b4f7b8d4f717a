"""Run every bench/bench_*.py in turn; each prints `name: value` lines and saves them to
bench/results/<script>.json, and the table in docs/benchmarks.md is rewritten from those files.

``--device`` and ``--dtype`` go to every script that loads a model (all but the RoPE table,
which is arithmetic on the CPU): ``python bench/run_all.py --device cuda --dtype bfloat16``.
"""

import argparse
import subprocess
import sys
from pathlib import Path

from shortlab.benchmarking import RESULTS_MARKERS, add_device_arguments, update_results_document

MODEL_FREE = {"bench_rope_table.py"}

args = add_device_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args()
failed = []
for script in sorted(Path(__file__).parent.glob("bench_*.py")):
    device_options = [] if script.name in MODEL_FREE else ["--device", args.device, "--dtype", args.dtype]
    print(f"# {script.name} {' '.join(device_options)}".rstrip(), flush=True)
    if subprocess.run([sys.executable, str(script), *device_options]).returncode != 0:
        failed.append(script.name)
root = Path(__file__).resolve().parent.parent
document = root / "docs" / "benchmarks.md"
if RESULTS_MARKERS[0] in document.read_text():
    changed = update_results_document(document, root / "bench" / "results")
    print(f"# {document.relative_to(root)}: {'table rewritten' if changed else 'unchanged'}")
if failed:
    sys.exit(f"failed: {failed}")
