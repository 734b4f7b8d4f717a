"""Cached safetensors load vs GGUF load (de-quantising) of the default model, side by side."""

import statistics

from transformers import AutoModelForCausalLM

from shortlab.benchmarking import median_ratio, report, time_side_by_side
from shortlab.models import DEFAULT_MODEL, EMBEDDED_MODELS, load_model


def main(repeats: int = 3) -> None:
    gguf = EMBEDDED_MODELS[DEFAULT_MODEL].parts[0].locate()
    load_model(DEFAULT_MODEL)  # make sure the cache exists before timing it

    seconds = time_side_by_side(
        {
            "gguf": lambda: AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name),
            "cached": lambda: load_model(DEFAULT_MODEL),
        },
        repeats=repeats, warmup=0,
    )
    report("model_load_gguf_median_s", statistics.median(seconds["gguf"]))
    report("model_load_cached_median_s", statistics.median(seconds["cached"]))
    report("model_load_speedup_cached_vs_gguf", median_ratio(seconds, "gguf", "cached"))


if __name__ == "__main__":
    main()
