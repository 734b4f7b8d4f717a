"""Scoring VQA answers with a LLaVA model on packed sequences: the vision features, the
decoder input with the projected features at the image tokens, the packed decoder forward
(optionally inside an intervention such as ShortV or FastV), and accuracy over a question set.

Model internals are reached through ``shortlab.arch.model_parts`` (decoder stack, token
embeddings, LM head, vision tower, projector), so any LLaVA-style wrapper the adapter knows works.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from shortlab.arch import ModelParts, UnsupportedArchitectureError, model_parts
from shortlab.llava_mini.easy_vqa import VQAItem, easy_vqa_answers
from shortlab.llava_mini.packing import PromptTokens, build_eval_sequence, packed_batch, prompt_tokens

# (packed input_ids, question-end mask) -> a context manager around the decoder forward
Intervention = Callable[[torch.Tensor, torch.Tensor], AbstractContextManager]


def _llava_parts(model) -> ModelParts:
    """``model_parts(model)`` of a wrapper with a LLaVA-style vision tower and projector."""
    parts = model_parts(model)
    if parts.vision_tower is None or parts.projector is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no LLaVA-style vision tower and projector in shortlab's "
            f"architecture adapter (shortlab.arch.WRAPPERS); easy-VQA scoring needs a LLaVA or "
            f"LLaVA-NeXT model"
        )
    return parts


def input_embeddings(model, input_ids, image_features):
    """The decoder's input [batch, seq, hidden] on the embedding's device: token embeddings of
    ``input_ids`` with ``image_features`` (already projected: [batch, image tokens, hidden], or
    [image tokens of all rows, hidden] as ``image_token_features`` returns them) at the image
    tokens, in order."""
    embed_tokens = model_parts(model).embed_tokens
    input_ids = input_ids.to(embed_tokens.weight.device)
    embeds = embed_tokens(input_ids)
    image_mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    n_tokens, n_features = int(image_mask[..., 0].sum()), image_features.numel() // embeds.shape[-1]
    if n_tokens != n_features:
        raise ValueError(f"{n_tokens} image tokens in input_ids but features for {n_features}: the prompt's "
                         f"image tokens were counted for images of another size")
    return embeds.masked_scatter(image_mask, image_features.to(device=embeds.device, dtype=embeds.dtype))


def packed_hidden_states(model, input_ids, position_ids, attention_mask, image_features):
    """Run the decoder stack of a LLaVA model on packed sequences, placing ``image_features``
    (already projected, [batch, image tokens, hidden]) at the image-token positions."""
    decoder = model_parts(model).decoder
    out = decoder(inputs_embeds=input_embeddings(model, input_ids, image_features),
                  attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def vision_features(model, pixel_values) -> torch.Tensor:
    """The vision tower's selected features (before the projector), exactly as LLaVA selects them:
    [batch, patches (+ CLS for the "full" strategy), tower width], on the tower's device.
    ``pixel_values`` [batch, 3, height, width] may live anywhere."""
    config = model.config
    tower = _llava_parts(model).vision_tower
    weight = next(tower.parameters())
    out = tower(pixel_values.to(device=weight.device, dtype=weight.dtype), output_hidden_states=True)
    features = out.hidden_states[config.vision_feature_layer]
    return features[:, 1:] if config.vision_feature_select_strategy == "default" else features


def image_token_features(model, pixel_values, image_sizes=None) -> torch.Tensor:
    """What the decoder reads at the image tokens of a batch of images, image after image:
    [image tokens of all images, hidden], in the model's dtype. ``pixel_values`` and
    ``image_sizes`` are the image processor's outputs. LLaVA: the projected ``vision_features``.
    LLaVA-NeXT: the model's own anyres path (the image's tiles, unpadded to its aspect ratio, with
    a learned newline embedding after each row), which needs ``image_sizes`` [images, 2]."""
    parts = _llava_parts(model)
    if parts.family == "llava_next":
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT features need the image processor's image_sizes (its anyres grid "
                             "depends on each image's size)")
        tower = next(parts.vision_tower.parameters())
        features = model.model.get_image_features(
            pixel_values=pixel_values.to(device=tower.device, dtype=tower.dtype), image_sizes=image_sizes,
        ).pooler_output
        return torch.cat(list(features)).to(model.dtype)
    projector = next(parts.projector.parameters())
    projected = parts.projector(vision_features(model, pixel_values).to(device=projector.device, dtype=model.dtype))
    return projected.flatten(0, 1)


@torch.no_grad()
def score_answers(model, processor, images, question_lists, answers=None, batch_size: int = 2,
                  tokens: PromptTokens | None = None, features: list[torch.Tensor] | None = None,
                  intervention: Intervention | None = None):
    """Closed-set VQA scoring with packed sequences (one forward per ``batch_size`` images).

    ``images``: PIL images (each gets the prompt prefix for its size: ``tokens.prefix_for``), or
    None when ``features`` (LLaVA only: the vision features of each image, as ``vision_features``
    returns them, for images of ``tokens.image_size``) are given; ``question_lists``: the questions
    of each image; ``answers``: the candidates every question is scored over (default easy-VQA's
    13), or a function from a question's text to its own candidates (a task's ``candidates``).
    Returns, per image and question, ``(scores, greedy)``: ``scores[answer]`` is the
    log-likelihood of the answer and its end token (``answer<|im_end|>`` for ChatML, `` yes</s>``
    for LLaVA-1.5 and LLaVA-NeXT-Mistral; sum over its tokens; see ``prompt_tokens``), and
    ``greedy`` the answer whose turn greedy decoding reproduces token by token (None if greedy
    decoding would write anything else).

    ``intervention(input_ids, question_ends)``, if given, returns a context manager that wraps the
    decoder forward of each batch: ``input_ids`` [batch, seq] are the packed token ids (token groups
    come from them, e.g. ``input_ids == image_token_id``) and ``question_ends`` a bool mask
    [batch, seq] of each question's last token (where the answer is read; FastV ranks visual tokens
    by the attention they get from there), both on the device of the token embeddings.

    Every tensor goes to the device of the module that reads it (vision tower, projector, token
    embeddings, LM head), so models placed with a ``device_map`` work as well.
    """
    answers = answers or easy_vqa_answers()
    candidates = answers if callable(answers) else (lambda question: answers)
    tokens = tokens or prompt_tokens(processor)
    dtype = model.dtype
    parts = _llava_parts(model)
    if features is not None and parts.family != "llava":
        raise ValueError(f"precomputed vision features are supported for LLaVA, not {parts.family} (whose "
                         f"image tokens depend on each image's size); pass the images instead")
    projector = parts.projector
    projector_device = next(projector.parameters()).device
    input_device = parts.embed_tokens.weight.device
    lm_head = parts.lm_head
    head_device = lm_head.weight.device
    results = []
    order = list(range(len(question_lists)))
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        if features is None:
            pixels = processor.image_processor([images[i] for i in chunk], return_tensors="pt")
            projected = image_token_features(model, pixels["pixel_values"], pixels.get("image_sizes"))
            prefixes = [tokens.prefix_for(images[i].size) for i in chunk]
        else:
            feats = torch.stack([features[i] for i in chunk])
            projected = projector(feats.to(device=projector_device, dtype=dtype))
            prefixes = [tokens.prefix] * len(chunk)
        built = [build_eval_sequence(tokens, question_lists[i], [candidates(q) for q in question_lists[i]], prefix)
                 for i, prefix in zip(chunk, prefixes)]
        input_ids, position_ids, mask = packed_batch([b[0] for b in built], tokens.end_id, dtype,
                                                     device=input_device)
        question_ends = torch.zeros(input_ids.shape, dtype=torch.bool)
        for row, (_, per_question, _) in enumerate(built):
            question_ends[row, [last for last, _ in per_question]] = True
        question_ends = question_ends.to(input_device)
        with intervention(input_ids, question_ends) if intervention else nullcontext():
            hidden = packed_hidden_states(model, input_ids, position_ids, mask, projected)
        for row, (_, per_question, answer_ids) in enumerate(built):
            needed = sorted({i for last, br in per_question for i in [last, *sum(br.values(), [])]})
            logits = lm_head(hidden[row, needed].to(head_device)).float()
            # Only the answer and end tokens are ever read: one small copy to the CPU instead of
            # a GPU wait for every scalar read below.
            vocab_ids = sorted({t for ids in answer_ids.values() for t in ids} | {tokens.end_id})
            column = {t: k for k, t in enumerate(vocab_ids)}
            target_logp = torch.log_softmax(logits, -1)[:, vocab_ids].cpu()
            logp = dict(zip(needed, target_logp))  # logp[r][column[t]]: log p(token t | reader r)
            argmax = dict(zip(needed, logits.argmax(-1).tolist()))
            image_results = []
            for last, branches in per_question:
                scores, greedy = {}, None
                for answer, positions in branches.items():
                    ids = answer_ids[answer]
                    readers = [last, *positions]  # position k predicts token k of ids + [end]
                    targets = [*ids, tokens.end_id]
                    scores[answer] = float(sum(logp[r][column[t]] for r, t in zip(readers, targets)))
                    if all(argmax[r] == t for r, t in zip(readers, targets)):
                        greedy = answer
                image_results.append((scores, greedy))
            results.append(image_results)
    return results


def evaluate_items(model, processor, items: list[VQAItem], split: str = "test", batch_size: int = 2,
                   features: dict[int, torch.Tensor] | None = None,
                   intervention: Intervention | None = None, image=None, task=None) -> dict:
    """Accuracy on ``items`` (grouped by image): closed-set log-likelihood argmax over each
    question's candidate answers (the task's ``candidates``: ``accuracy``) and greedy exact match (``greedy_accuracy``). ``intervention``: as in
    ``score_answers``. ``image``: one image shown with every question instead of its own (e.g.
    the task's blank image, the blank-image baseline). ``task``: a ``VQATask`` or its name
    (default easy-VQA), which gives the images of ``split`` and the answer set."""
    from shortlab.llava_mini.tasks import task as find_task

    vqa_task = find_task(task or "easy-vqa")
    by_image: dict[int, list[VQAItem]] = defaultdict(list)
    for item in items:
        by_image[item.image_id].append(item)
    image_ids = list(by_image)
    if image is not None and features is not None:
        raise ValueError("pass either features or one image for every question, not both")
    if image is not None:
        images = [image] * len(image_ids)
    else:
        images = None if features is not None else [vqa_task.image(split, i) for i in image_ids]
    feats = [features[i] for i in image_ids] if features is not None else None
    results = score_answers(model, processor, images, [[it.question for it in by_image[i]] for i in image_ids],
                            answers=vqa_task.candidates, batch_size=batch_size, features=feats,
                            intervention=intervention)
    correct = greedy_correct = total = 0
    predictions = []
    for image_id, image_results in zip(image_ids, results):
        for item, (scores, greedy) in zip(by_image[image_id], image_results):
            predicted = max(scores, key=scores.__getitem__)
            correct += predicted == item.answer
            greedy_correct += greedy == item.answer
            total += 1
            predictions.append((item, predicted, greedy))
    return {"accuracy": correct / total, "greedy_accuracy": greedy_correct / total, "n": total,
            "predictions": predictions}
