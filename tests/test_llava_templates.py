"""The packed easy-VQA scorer on the real LLaVA chat templates: tiny random models with the exact
classes and templates of llava-hf/llava-1.5-7b-hf (Vicuna: "USER: <image>\\nQ ASSISTANT:", a space
before the answer, no end token written) and llava-hf/llava-v1.6-mistral-7b-hf (anyres tiling,
"[INST] <image>\\nQ [/INST]"), next to tiny-llava's ChatML."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from shortlab import llava_mini as lm
from shortlab.models import load_model

TEMPLATE_MODELS = ("tiny-llava", "tiny-llava-1.5", "tiny-llava-next")
QUESTIONS = ["is there a red shape?", "what shape is in the image?", "what color is the shape?"]


@pytest.fixture(scope="module", params=TEMPLATE_MODELS)
def loaded(request):
    model, processor = load_model(request.param)
    return request.param, model, processor, lm.prompt_tokens(processor)


def _images():
    """An easy-VQA image (64 x 64) and a random 40 x 60 one: LLaVA-NeXT tiles them on different grids."""
    noise = np.random.RandomState(0).randint(0, 256, (60, 40, 3), dtype=np.uint8)
    return [lm.easy_vqa_image("test", 0), Image.fromarray(noise)]


def _conversation(processor, question, answer):
    return processor.apply_chat_template([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": lm.user_prompt(question)}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ], tokenize=False)


def test_tiny_models_carry_the_real_classes_and_templates():
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    model, processor = load_model("tiny-llava-1.5")
    assert type(model) is LlavaForConditionalGeneration
    assert lm.chat_text(processor, "is there a red shape?") == \
        "USER: <image>\nIs there a red shape? Answer with one word. ASSISTANT:"
    assert _conversation(processor, "is there a red shape?", "yes").endswith("ASSISTANT: yes ")
    model, processor = load_model("tiny-llava-next")
    assert type(model) is LlavaNextForConditionalGeneration
    assert lm.chat_text(processor, "is there a red shape?") == \
        "[INST] <image>\nIs there a red shape? Answer with one word. [/INST]"
    assert _conversation(processor, "is there a red shape?", "yes").endswith(" [/INST] yes</s> ")
    # Llama-style tokenizers: the processor prepends BOS, and </s> is the EOS
    ids = processor(images=_images()[0], text="[INST] <image>\nHi [/INST]")["input_ids"][0]
    assert ids[0] == processor.tokenizer.bos_token_id == processor.tokenizer.convert_tokens_to_ids("<s>")
    assert processor.tokenizer.eos_token == "</s>"


def test_separator_and_end_token_follow_the_template(loaded):
    name, _, processor, tokens = loaded
    tokenizer = processor.tokenizer
    expected = {  # (separator, end token)
        "tiny-llava": ("", "<|im_end|>"),  # ChatML writes the answer right after the header
        "tiny-llava-1.5": (" ", "</s>"),  # writes only "yes ": the EOS token ends the answer
        "tiny-llava-next": (" ", "</s>"),  # writes " yes</s> "
    }[name]
    assert (tokens.separator, tokenizer.convert_ids_to_tokens(tokens.end_id)) == expected
    assert tokens.end_id == tokenizer.convert_tokens_to_ids("</s>" if name != "tiny-llava" else "<|im_end|>")


@pytest.mark.parametrize("answer", ["yes", "red", "rectangle"])
def test_prefix_block_answer_end_are_the_processor_ids_of_the_conversation(loaded, answer):
    name, _, processor, tokens = loaded
    for image in _images():
        prefix = tokens.prefix_for(image.size)
        for question in QUESTIONS:
            prompt_ids = processor(images=image, text=lm.chat_text(processor, question))["input_ids"][0]
            assert list(prompt_ids) == prefix + tokens.block(question)
            full = _conversation(processor, question, answer)
            ids = list(processor(images=image, text=full)["input_ids"][0])
            packed = prefix + tokens.block(question) + tokens.answer(answer)
            assert ids[: len(packed)] == packed
            rest = ids[len(packed):]
            if name == "tiny-llava-1.5":  # nothing token-like follows: EOS is what the model must write
                assert processor.tokenizer.decode(rest).strip() == ""
                assert tokens.end_id == processor.tokenizer.eos_token_id
            else:
                assert rest[0] == tokens.end_id


def test_image_token_count_follows_the_image_size(loaded):
    name, model, processor, tokens = loaded
    small, large = Image.new("RGB", (40, 60)), Image.new("RGB", (200, 120))
    sizes = [(64, 64), (40, 60), (200, 120)]
    counts = {size: tokens.prefix_for(size).count(model.config.image_token_id) for size in sizes}
    for image in (small, large):
        ids = processor(images=image, text=lm.chat_text(processor, "hi"))["input_ids"][0]
        assert list(ids).count(model.config.image_token_id) == counts[image.size]
    assert tokens.prefix == tokens.prefix_for(lm.easy_vqa_image("test", 0).size)  # easy-VQA's default
    assert (len(set(counts.values())) > 1) == (name == "tiny-llava-next")  # anyres: size-dependent


def _alone_log_likelihood(model, processor, tokens, image, question, answer):
    """log p(answer tokens + end token | image, question), from the processor's own unpacked input."""
    prompt = processor(images=image, text=lm.chat_text(processor, question), return_tensors="pt")
    batch = processor(images=image, text=lm.chat_text(processor, question) + tokens.separator + answer,
                      return_tensors="pt")
    ids = torch.cat([batch["input_ids"], torch.tensor([[tokens.end_id]])], dim=1)
    inputs = {**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logp = torch.log_softmax(model(**inputs).logits[0].float(), -1)
    start = prompt["input_ids"].shape[1]
    return float(sum(logp[k - 1, ids[0, k]] for k in range(start, ids.shape[1])))


def test_packed_scores_equal_scoring_each_question_alone(loaded):
    name, model, processor, tokens = loaded
    images = _images()
    answers = lm.easy_vqa_answers()
    packed = lm.score_answers(model, processor, images, [QUESTIONS, QUESTIONS[:2]], tokens=tokens, batch_size=2)
    for image, questions, per_question in zip(images, [QUESTIONS, QUESTIONS[:2]], packed):
        for question, (scores, _) in zip(questions, per_question):
            assert sorted(scores) == sorted(answers)
            alone = {a: _alone_log_likelihood(model, processor, tokens, image, question, a) for a in answers}
            np.testing.assert_allclose([scores[a] for a in answers], [alone[a] for a in answers], atol=2e-4)


def test_evaluate_items_runs(loaded):
    name, model, processor, _ = loaded
    items = lm.fixed_test_questions(6, seed=1)
    result = lm.evaluate_items(model, processor, items, batch_size=2)
    assert result["n"] == 6 and 0 <= result["accuracy"] <= 1 and 0 <= result["greedy_accuracy"] <= 1
    assert all(predicted in lm.easy_vqa_answers() for _, predicted, _ in result["predictions"])
    blank = lm.evaluate_items(model, processor, items, image=lm.blank_image())
    assert blank["n"] == 6


def test_precomputed_features_match_images_for_llava_and_are_refused_for_llava_next():
    items = lm.fixed_test_questions(4, seed=2)
    model, processor = load_model("tiny-llava-1.5")
    features = {}
    for image_id in {item.image_id for item in items}:
        pixels = processor.image_processor([lm.easy_vqa_image("test", image_id)], return_tensors="pt")
        features[image_id] = lm.vision_features(model, pixels["pixel_values"])[0]
    from_images = lm.evaluate_items(model, processor, items)
    from_features = lm.evaluate_items(model, processor, items, features=features)
    assert [p[1] for p in from_images["predictions"]] == [p[1] for p in from_features["predictions"]]
    model, processor = load_model("tiny-llava-next")
    with pytest.raises(ValueError, match="not llava_next.*pass the images"):
        lm.evaluate_items(model, processor, items, features=features)


def test_image_token_features_need_llava_next_image_sizes():
    model, processor = load_model("tiny-llava-next")
    pixels = processor.image_processor(_images(), return_tensors="pt")
    features = lm.image_token_features(model, pixels["pixel_values"], pixels["image_sizes"])
    tokens = lm.prompt_tokens(processor)
    expected = sum(tokens.prefix_for(image.size).count(model.config.image_token_id) for image in _images())
    assert features.shape == (expected, model.config.text_config.hidden_size)
    with pytest.raises(ValueError, match="image_sizes"):
        lm.image_token_features(model, pixels["pixel_values"])


def _with_template(processor, template):
    changed = copy.copy(processor)
    changed.chat_template = template
    return changed


_TURN = "{{ message['role'].upper() + ': ' }}"
_CONTENT = ("{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template,problem", [
    ("{% for message in messages %}" + _TURN + "<image>\n" + _CONTENT + " {% endfor %}"
     "{% if add_generation_prompt %}ASSISTANT:{% endif %}", "writes 2 image tokens"),
    ("{% for message in messages %}" + _TURN + "{% for c in message['content'] | reverse %}"
     "{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
     "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}", "question once, after the image"),
    # the generation prompt ("BOT:") is not what precedes an answer ("ASSISTANT: ...")
    ("{% for message in messages %}" + _TURN + _CONTENT + " {% endfor %}"
     "{% if add_generation_prompt %}BOT:{% endif %}", "does not write the assistant answer after the generation"),
])
def test_unsupported_templates_are_refused_with_the_reason(template, problem):
    _, processor = load_model("tiny-llava-1.5")
    with pytest.raises(ValueError, match=problem):
        lm.prompt_tokens(_with_template(processor, template))


def test_a_tokenizer_merge_across_the_answer_split_is_refused():
    _, processor = load_model("tiny-llava-1.5")
    # the answer glued to a generation prompt ending in a word: " Answer" + "yes" tokenizes as
    # " An", "sw", "ery", "es", so no ids of "yes" follow those of the prompt
    template = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: " + _CONTENT
                + "{% else %} Answer{{ message['content'][0]['text'] }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %} Answer{% endif %}")
    tokens = lm.prompt_tokens(_with_template(processor, template))
    assert tokens.separator == "" and tokens.answer("red") == processor.tokenizer("red")["input_ids"][1:]
    with pytest.raises(ValueError, match="merges 'yes' with the text before it"):
        tokens.answer("yes")
