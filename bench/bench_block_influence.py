"""Block Influence cost vs a plain forward on the same batch, time and peak memory.

Time: BI (hooks + streaming per-layer accumulators) and a plain forward through the decoder
(``forward_for_hidden_states``: LM head on the last position only, as BI runs it) alternate in
one run; the ratio against a full-logits forward is printed too.
Memory: each mode runs in a fresh process; after one warm-up plain forward (so weights and
activations of a forward are already resident), a thread samples the resident set size every
millisecond during the mode, and the peak above the RSS just before it is what the mode adds.
The children run with glibc's mmap threshold lowered so freed tensors go back to the OS at once
and RSS follows live memory instead of the allocator's free lists.
Storing every layer's hidden states (``output_hidden_states=True``) is shown for contrast.
On CUDA (``--device cuda``) the memory is the peak of allocated CUDA memory above what was
allocated before the mode ran (``peak_cuda_growth_mib_*``) instead of the resident set.
"""

import argparse
import os
import subprocess
import sys
import threading

import torch

from shortlab.arch import forward_for_hidden_states
from shortlab.benchmarking import (
    add_device_arguments, cuda_devices, median_ratio, report, save_results, time_side_by_side,
)
from shortlab.data import calibration_batch
from shortlab.metrics import block_influence
from shortlab.models import DEFAULT_MODEL, load_model

N_BLOCKS, SEQ_LEN = 8, 512


def setup(device: str, dtype: str):
    torch.manual_seed(0)
    model, tokenizer = load_model(DEFAULT_MODEL, dtype=dtype, device=device)
    batch = calibration_batch(tokenizer, "wiki", N_BLOCKS, SEQ_LEN)
    return model, {name: tensor.to(device) for name, tensor in batch.items()}


def plain_forward(model, batch):
    with torch.inference_mode():
        return forward_for_hidden_states(model, batch).logits


def full_logits_forward(model, batch):
    with torch.inference_mode():
        return model(**batch, use_cache=False).logits


def keep_all_hidden_states(model, batch):
    with torch.inference_mode():
        return forward_for_hidden_states(model, {**batch, "output_hidden_states": True}).hidden_states


MODES = {
    "forward": plain_forward,
    "block_influence": lambda model, batch: block_influence(model, [batch]),
    "all_hidden_states": keep_all_hidden_states,
}


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_cuda_growth_mib(mode: str, model, batch) -> float:
    """Peak allocated CUDA memory above the allocation before one pass of ``mode``."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kept = MODES[mode](model, batch)  # held until measured, as a caller would hold it
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del kept
    return (peak - before) / 2**20


def peak_growth_mib(mode: str, device: str, dtype: str) -> float:
    """Run in a child process: peak growth of the resident set (CUDA memory on a CUDA device)
    during one pass of ``mode``."""
    model, batch = setup(device, dtype)
    plain_forward(model, batch)
    if torch.device(device).type == "cuda":
        return peak_cuda_growth_mib(mode, model, batch)
    before = resident_bytes()
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            done.wait(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        kept = MODES[mode](model, batch)  # held until measured, as a caller would hold it
        peak[0] = max(peak[0], resident_bytes())
    finally:
        done.set()
        sampler.join()
    del kept
    return (peak[0] - before) / 2**20


def main(device: str, dtype: str) -> None:
    model, batch = setup(device, dtype)
    seconds = time_side_by_side(
        {"forward": lambda: plain_forward(model, batch),
         "full_logits_forward": lambda: full_logits_forward(model, batch),
         "block_influence": lambda: block_influence(model, [batch])},
        repeats=7, warmup=1, devices=cuda_devices(model),
    )
    report("bi_time_over_forward", median_ratio(seconds, "block_influence", "forward"))
    report("bi_time_over_full_logits_forward",
           median_ratio(seconds, "block_influence", "full_logits_forward"))
    memory = "cuda" if torch.device(device).type == "cuda" else "rss"
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--memory", mode, "--device", device,
                              "--dtype", dtype], capture_output=True, text=True, check=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}).stdout
        report(f"peak_{memory}_growth_mib_{mode}", float(out.strip().splitlines()[-1]))
    element_bytes = next(model.parameters()).element_size()  # hidden states share the weights' dtype
    hidden_mib = ((model.config.num_hidden_layers + 1) * N_BLOCKS * SEQ_LEN * model.config.hidden_size
                  * element_bytes / 2**20)
    report("all_layers_hidden_states_mib_if_kept", hidden_mib)


if __name__ == "__main__":
    parser = add_device_arguments(argparse.ArgumentParser())
    parser.add_argument("--memory", choices=sorted(MODES))
    args = parser.parse_args()
    if args.memory:
        print(peak_growth_mib(args.memory, args.device, args.dtype))
    else:
        main(args.device, args.dtype)
        save_results(__file__)
