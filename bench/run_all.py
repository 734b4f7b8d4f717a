"""Run every bench/bench_*.py in turn; each prints `name: value` lines.

``--device`` and ``--dtype`` go to every script that loads a model (all but the RoPE table,
which is arithmetic on the CPU): ``python bench/run_all.py --device cuda --dtype bfloat16``.
"""

import argparse
import subprocess
import sys
from pathlib import Path

from shortlab.benchmarking import add_device_arguments

MODEL_FREE = {"bench_rope_table.py"}

args = add_device_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args()
failed = []
for script in sorted(Path(__file__).parent.glob("bench_*.py")):
    device_options = [] if script.name in MODEL_FREE else ["--device", args.device, "--dtype", args.dtype]
    print(f"# {script.name} {' '.join(device_options)}".rstrip(), flush=True)
    if subprocess.run([sys.executable, str(script), *device_options]).returncode != 0:
        failed.append(script.name)
if failed:
    sys.exit(f"failed: {failed}")
