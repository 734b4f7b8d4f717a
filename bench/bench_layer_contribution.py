"""Layer Contribution of every llava-mini layer: the rerun method vs one full forward per layer.

ShortV ranks layers by the KL divergence each one causes when it stops updating the visual
tokens. The definition costs one full forward per layer (vision tower and full-sequence logits
included); ``layer_contribution``'s default method runs the model once, then reruns only layers
l..L-1 from layer l's stored input and the LM head only at the answer position. Both run on the
same batch of easy-VQA prompts (256 visual tokens each at 224 px), interleaved, one torch
thread; the values of the two must agree. Times are the process's CPU seconds: with one thread
that is the compute itself, while wall-clock time on this shared 2-core machine also counts the
time other jobs hold the cores, which changes over the minutes one run takes and skews the ratio.
On CUDA (``--device cuda``) the work is on the GPU, so wall-clock seconds are timed instead.
"""

import argparse
import statistics
import time

import torch

from shortlab import llava_mini
from shortlab.benchmarking import (
    add_device_arguments, cuda_devices, median_ratio, report, save_results, time_side_by_side,
)
from shortlab.contribution import layer_contribution, token_groups
from shortlab.models import load_model

N_SAMPLES = 2


def setup(device: str, dtype: str):
    model, processor = load_model("llava-mini", dtype=dtype, device=device)
    items = llava_mini.fixed_test_questions(N_SAMPLES, seed=1)
    batch = dict(processor(
        images=[llava_mini.easy_vqa_image("test", item.image_id) for item in items],
        text=[llava_mini.chat_text(processor, item.question) for item in items],
        return_tensors="pt", padding=True,
    ).to(device))
    visual = token_groups(model, batch["input_ids"], batch["attention_mask"])["visual"]
    with torch.inference_mode():  # warm-up: each timed run is itself 16 to 31 forwards
        model(**batch, use_cache=False)
    return model, batch, visual


def main() -> None:
    args = add_device_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args()
    on_cuda = torch.device(args.device).type == "cuda"
    torch.set_num_threads(1)
    model, batch, visual = setup(args.device, args.dtype)
    report("samples", batch["input_ids"].shape[0])
    report("sequence_length", batch["input_ids"].shape[1])
    report("visual_tokens_per_sample", visual.sum(dim=1).float().mean().item())
    values = {}

    def run(method: str):
        values[method] = layer_contribution(model, batch, visual, method=method)

    seconds = time_side_by_side(
        {"rerun": lambda: run("rerun"), "full_forward": lambda: run("full_forward")},
        repeats=3, warmup=0, clock=time.perf_counter if on_cuda else time.process_time,
        devices=cuda_devices(model),
    )
    report("layers", len(values["rerun"]))
    clock = "seconds" if on_cuda else "cpu_seconds"
    report(f"{clock}_rerun", statistics.median(seconds["rerun"]))
    report(f"{clock}_full_forward", statistics.median(seconds["full_forward"]))
    report("speedup_rerun_over_full_forward", median_ratio(seconds, "full_forward", "rerun"))
    report("max_abs_difference",
           max(abs(values["rerun"][i] - values["full_forward"][i]) for i in values["rerun"]))
    report("max_layer_contribution", max(values["rerun"].values()))


if __name__ == "__main__":
    main()
    save_results(__file__)
