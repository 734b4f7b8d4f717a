"""What ShortV's frozen visual tokens buy in a real prefill: measured vs FLOPs-predicted speedup.

llava-mini-336 (576 visual tokens, LLaVA-1.5's count) answers one easy-VQA question about an
image upscaled to 336 px by its processor, batch 1, no KV cache. The deepest 18 of its 30 decoder
layers (60 %) freeze the visual tokens (``shortv.freeze_visual_tokens``; any fixed 18 layers cost
the same). Timed side by side (interleaved repetitions, medians):

* decoder: the language model's stack alone on the prepared input embeddings, what
  ``flops.prefill_flops`` counts; the line to hold against the prediction (target: measured /
  predicted speedup ≥ 0.85);
* full model: vision tower, projector, decoder and the LM head on the last position, for scale
  (the tower and head are not sped up, so this speedup is smaller).

Usage: ``python bench/bench_shortv_speed.py [--threads 1 2] [--device cuda] [--dtype bfloat16]``
(torch intra-op threads per run, each printed with its own suffix; on CUDA they only set the
CPU threads that launch the kernels).
"""

import argparse
import statistics

import torch

from shortlab import llava_mini as lm
from shortlab.arch import model_parts
from shortlab.benchmarking import add_device_arguments, cuda_devices, report, time_side_by_side
from shortlab.flops import flops_ratio
from shortlab.models import load_model
from shortlab.shortv import freeze_visual_tokens

MODEL = "llava-mini-336"
N_FROZEN = 18
REPEATS, WARMUP = 7, 1


def setup(device: str, dtype: str):
    model, processor = load_model(MODEL, dtype=dtype, device=device)
    item = lm.fixed_test_questions(1)[0]
    image = lm.easy_vqa_image("test", item.image_id)  # 64 px; the processor upscales it
    inputs = processor(text=lm.chat_text(processor, item.question), images=image,
                       return_tensors="pt").to(device)
    with torch.inference_mode():
        features = lm.vision_features(model, inputs["pixel_values"])
        embeds = lm.input_embeddings(model, inputs["input_ids"], model_parts(model).projector(features))
    return model, dict(inputs), embeds, inputs["input_ids"] == model.config.image_token_id


def main() -> None:
    parser = add_device_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    args = parser.parse_args()

    torch.manual_seed(0)
    model, inputs, embeds, image_mask = setup(args.device, args.dtype)
    parts = model_parts(model)
    decoder = parts.decoder
    frozen = list(range(parts.num_layers - N_FROZEN, parts.num_layers))
    n_visual = int(image_mask.sum())
    n_text = image_mask.shape[1] - n_visual
    report("tokens_text", n_text)
    report("tokens_visual", n_visual)
    report("layers_frozen", len(frozen))
    report("first_frozen_layer", frozen[0])
    predicted = 1 / flops_ratio(parts.text_config, n_text, n_visual, frozen)

    @torch.inference_mode()
    def run_decoder(freeze: bool):
        if freeze:
            with freeze_visual_tokens(model, frozen, image_mask):
                decoder(inputs_embeds=embeds, use_cache=False)
        else:
            decoder(inputs_embeds=embeds, use_cache=False)

    @torch.inference_mode()
    def run_model(freeze: bool):
        if freeze:  # no token_mask: the image tokens are read from input_ids
            with freeze_visual_tokens(model, frozen):
                model(**inputs, use_cache=False, logits_to_keep=1)
        else:
            model(**inputs, use_cache=False, logits_to_keep=1)

    threads_before = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            seconds = time_side_by_side(
                {
                    "decoder_dense": lambda: run_decoder(False),
                    "decoder_frozen": lambda: run_decoder(True),
                    "model_dense": lambda: run_model(False),
                    "model_frozen": lambda: run_model(True),
                },
                repeats=REPEATS, warmup=WARMUP, devices=cuda_devices(model),
            )
            median = {name: statistics.median(times) for name, times in seconds.items()}
            measured = median["decoder_dense"] / median["decoder_frozen"]
            suffix = f"_{threads}t"
            report(f"decoder_seconds_dense{suffix}", median["decoder_dense"])
            report(f"decoder_seconds_frozen{suffix}", median["decoder_frozen"])
            report(f"decoder_speedup_measured{suffix}", measured)
            report(f"decoder_speedup_flops{suffix}", predicted)
            report(f"decoder_speedup_measured_over_flops{suffix}", measured / predicted)
            model_speedup = median["model_dense"] / median["model_frozen"]
            report(f"model_speedup_measured{suffix}", model_speedup)
    finally:
        torch.set_num_threads(threads_before)


if __name__ == "__main__":
    main()
