"""Cached safetensors load vs GGUF load (de-quantising) of the default model, side by side, each
ending with the model on ``--device`` in ``--dtype``."""

import argparse
import statistics

from transformers import AutoModelForCausalLM

from shortlab.benchmarking import add_device_arguments, median_ratio, report, save_results, time_side_by_side
from shortlab.models import DEFAULT_MODEL, EMBEDDED_MODELS, load_model, resolve_dtype


def main(device: str, dtype: str, repeats: int = 3) -> None:
    gguf = EMBEDDED_MODELS[DEFAULT_MODEL].parts[0].locate()
    torch_dtype = resolve_dtype(dtype)
    load_model(DEFAULT_MODEL)  # make sure the cache exists before timing it

    seconds = time_side_by_side(
        {
            "gguf": lambda: AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype).to(device),
            "cached": lambda: load_model(DEFAULT_MODEL, dtype=dtype, device=device),
        },
        repeats=repeats, warmup=0, devices=[device],
    )
    report("model_load_gguf_median_s", statistics.median(seconds["gguf"]))
    report("model_load_cached_median_s", statistics.median(seconds["cached"]))
    report("model_load_speedup_cached_vs_gguf", median_ratio(seconds, "gguf", "cached"))


if __name__ == "__main__":
    args = add_device_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args()
    main(args.device, args.dtype)
    save_results(__file__)
