"""What ShortV's frozen visual tokens buy in a real prefill: measured vs FLOPs-predicted speedup,
at every N of notebook 02's sweep, and where the difference goes.

llava-mini (224 px: 256 visual tokens, the count notebook 02 runs at) answers one scene question,
batch 1, no KV cache. The deepest N of its 30 decoder layers freeze the visual tokens
(``shortv.freeze_visual_tokens``; which N layers does not change the cost, since every layer
costs the same). Timed side by side (interleaved repetitions, medians):

* decoder: the language model's stack alone on the prepared input embeddings, what
  ``flops.prefill_flops`` counts, at every N: ``decoder_speedup_measured_over_flops_N<n>`` is the
  line to hold against the prediction;
* full model at the largest N: vision tower, projector, decoder and the LM head on the last
  position, for scale (the tower and head are not sped up, so this speedup is smaller).

Where the rest goes: one profiled run of the dense and of the most frozen decoder splits their
time into matrix products (what the FLOPs count), attention, gathering and scattering the active
tokens (only a frozen layer does it) and everything else (norms, rotary embedding, residual adds,
masks). If every part shrank by the predicted factor the speedup would match the FLOPs; each
part's excess over that is its share of the shortfall (``shortfall_share_<part>``, summing to 1).

Usage: ``python bench/bench_shortv_speed.py [--threads 1 2] [--frozen 6 12 18 24] [--model llava-mini-336]
[--device cuda] [--dtype bfloat16]``.
"""

import argparse
import statistics

import torch

from shortlab import llava_mini as lm
from shortlab.arch import model_parts
from shortlab.benchmarking import add_device_arguments, cuda_devices, report, save_results, time_side_by_side
from shortlab.flops import flops_ratio
from shortlab.models import load_model
from shortlab.shortv import freeze_visual_tokens

REPEATS, WARMUP = 5, 1
PARTS = ("matmul", "attention", "gather_scatter", "other")
_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}
_GATHER = {"aten::index", "aten::index_select", "aten::gather", "aten::scatter", "aten::scatter_",
           "aten::index_put_", "aten::index_copy", "aten::index_copy_", "aten::masked_select",
           "aten::nonzero", "aten::masked_scatter", "aten::masked_fill"}


def part_of(op: str) -> str:
    if op in _MATMUL:
        return "matmul"
    if "attention" in op or "flash" in op:
        return "attention"
    return "gather_scatter" if op in _GATHER else "other"


def profiled_parts(run) -> dict[str, float]:
    """Self CPU seconds of one ``run()`` per part (``PARTS``), from the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile

    run()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    seconds = dict.fromkeys(PARTS, 0.0)
    for event in prof.key_averages():
        seconds[part_of(event.key)] += event.self_cpu_time_total / 1e6
    return seconds


def setup(model_name: str, device: str, dtype: str):
    model, processor = load_model(model_name, dtype=dtype, device=device)
    scenes = lm.task("scenes")
    item = scenes.questions("test")[0]
    image = scenes.image("test", item.image_id)
    inputs = processor(text=lm.chat_text(processor, item.question), images=image, return_tensors="pt").to(device)
    with torch.inference_mode():
        features = lm.vision_features(model, inputs["pixel_values"])
        embeds = lm.input_embeddings(model, inputs["input_ids"], model_parts(model).projector(features))
    return model, dict(inputs), embeds, inputs["input_ids"] == model.config.image_token_id


def main() -> None:
    parser = add_device_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--model", default="llava-mini", help="llava-mini (256 visual tokens) or llava-mini-336 (576)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--frozen", type=int, nargs="+", default=[6, 12, 18, 24], help="N: layers frozen")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, inputs, embeds, image_mask = setup(args.model, args.device, args.dtype)
    parts = model_parts(model)
    decoder = parts.decoder
    counts = sorted({min(n, parts.num_layers) for n in args.frozen if n > 0})
    layers = {n: list(range(parts.num_layers - n, parts.num_layers)) for n in counts}
    n_visual = int(image_mask.sum())
    n_text = image_mask.shape[1] - n_visual
    report("tokens_text", n_text)
    report("tokens_visual", n_visual)
    predicted = {n: 1 / flops_ratio(parts.text_config, n_text, n_visual, layers[n]) for n in counts}

    @torch.inference_mode()
    def run_decoder(frozen: list[int]):
        if frozen:
            with freeze_visual_tokens(model, frozen, image_mask):
                decoder(inputs_embeds=embeds, use_cache=False)
        else:
            decoder(inputs_embeds=embeds, use_cache=False)

    @torch.inference_mode()
    def run_model(frozen: list[int]):
        if frozen:  # no token_mask: the image tokens are read from input_ids
            with freeze_visual_tokens(model, frozen):
                model(**inputs, use_cache=False, logits_to_keep=1)
        else:
            model(**inputs, use_cache=False, logits_to_keep=1)

    most = counts[-1]
    threads_before = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            candidates = {"decoder_dense": lambda: run_decoder([])}
            candidates.update({f"decoder_N{n}": (lambda n=n: run_decoder(layers[n])) for n in counts})
            candidates.update({"model_dense": lambda: run_model([]), f"model_N{most}": lambda: run_model(layers[most])})
            seconds = time_side_by_side(candidates, repeats=REPEATS, warmup=WARMUP, devices=cuda_devices(model))
            median = {name: statistics.median(times) for name, times in seconds.items()}
            suffix = f"_{threads}t"
            report(f"decoder_seconds_dense{suffix}", median["decoder_dense"])
            for n in counts:
                measured = median["decoder_dense"] / median[f"decoder_N{n}"]
                report(f"decoder_speedup_flops_N{n}{suffix}", predicted[n])
                report(f"decoder_speedup_measured_N{n}{suffix}", measured)
                report(f"decoder_speedup_measured_over_flops_N{n}{suffix}", measured / predicted[n])
            report(f"model_speedup_measured_N{most}{suffix}", median["model_dense"] / median[f"model_N{most}"])

            if args.device == "cpu":  # the CPU profiler sees CPU kernels only
                dense = profiled_parts(lambda: run_decoder([]))
                frozen = profiled_parts(lambda: run_decoder(layers[most]))
                excess = {part: frozen[part] - dense[part] / predicted[most] for part in PARTS}
                shortfall = sum(excess.values())
                for part in PARTS:
                    report(f"profile_share_dense_{part}{suffix}", dense[part] / sum(dense.values()))
                    report(f"profile_speedup_N{most}_{part}{suffix}", dense[part] / max(frozen[part], 1e-9))
                    if shortfall > 0:
                        report(f"shortfall_share_N{most}_{part}{suffix}", excess[part] / shortfall)
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    main()
    save_results(__file__)
