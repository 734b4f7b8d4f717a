"""What removing a quarter of the layers buys on the default model: measured vs ideal speedup.

ShortGPT's choice (the 25 % of layers with the lowest Block Influence on a few wiki blocks) is
deleted for real with ``remove_layers``; the dense and pruned models' prefill and decode then
alternate in one run (``speed.measure_speed``, medians). Printed next to each measured speedup:
the ideal L / (L − n), and the ratio of weights each token is multiplied by (decoder linear
layers + LM head), which accounts for the LM head that removing layers does not shrink.
Memory: parameter bytes and measured KV-cache bytes for a 1024-token context.
``--device`` and ``--dtype`` choose where and in what precision both models run.
"""

import argparse

import torch

from shortlab.arch import model_parts
from shortlab.benchmarking import add_device_arguments, report, save_results
from shortlab.data import calibration_batch, iter_batches
from shortlab.models import DEFAULT_MODEL, load_model
from shortlab.pruning import remove_layers, rank_layers
from shortlab.speed import kv_cache_bytes, matmul_weight_count, measure_speed, parameter_bytes

FRACTION = 0.25
PROMPT_LEN, NEW_TOKENS, BATCH_SIZE, REPEATS = 256, 16, 1, 7
KV_CONTEXT = 1024


def main() -> None:
    args = add_device_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(DEFAULT_MODEL, dtype=args.dtype, device=args.device)
    num_layers = model_parts(model).num_layers
    n_remove = round(FRACTION * num_layers)
    calibration = [{name: tensor.to(args.device) for name, tensor in batch.items()}
                   for batch in iter_batches(calibration_batch(tokenizer, "wiki", 4, 256), 4)]
    removed = rank_layers("block_influence", model, calibration, n_remove)
    pruned = remove_layers(model, removed)
    report("layers_dense", num_layers)
    report("layers_removed", n_remove)

    speeds = measure_speed({"dense": model, "pruned": pruned}, prompt_len=PROMPT_LEN,
                           new_tokens=NEW_TOKENS, batch_size=BATCH_SIZE, repeats=REPEATS)
    ideal_layers = num_layers / (num_layers - n_remove)
    ideal_weights = matmul_weight_count(model) / matmul_weight_count(pruned)
    for phase in ("prefill", "decode"):
        dense = getattr(speeds["dense"], f"{phase}_tokens_per_s")
        fewer = getattr(speeds["pruned"], f"{phase}_tokens_per_s")
        report(f"{phase}_tokens_per_s_dense", dense)
        report(f"{phase}_tokens_per_s_pruned", fewer)
        report(f"{phase}_speedup_measured", fewer / dense)
    report("speedup_ideal_layers", ideal_layers)
    report("speedup_ideal_matmul_weights", ideal_weights)
    report("parameter_bytes_ratio_pruned_over_dense", parameter_bytes(pruned) / parameter_bytes(model))
    report("kv_cache_bytes_ratio_pruned_over_dense",
           kv_cache_bytes(pruned, KV_CONTEXT) / kv_cache_bytes(model, KV_CONTEXT))


if __name__ == "__main__":
    main()
    save_results(__file__)
