import importlib.util
import os
import sys

import pytest
import torch
import yaml

from shortlab.evaluate import (
    TASKS,
    encode_examples,
    load_task,
    loglikelihoods,
    score_examples,
    seeded_subset,
)
from shortlab.harness import (
    HARNESS_TASKS,
    OFFLINE_ENVIRONMENT,
    evaluate_with_lm_eval,
    lm_eval_task_configs,
)
from shortlab.models import load_model
from shortlab.pruning import remove_layers
from shortlab.shortv import freeze_visual_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="the optional lm-eval package is not installed"
)


def _our_items(model, tokenizer, examples):
    """Per-document (acc, acc_norm) correctness from shortlab.evaluate's scorer."""
    logliks = loglikelihoods(model, encode_examples(tokenizer, examples), batch_size=16).tolist()
    items, position = [], 0
    for example in examples:
        scores = logliks[position : position + len(example.choices)]
        position += len(example.choices)
        item = score_examples([example], scores)
        items.append((item["acc"] == 1.0, item["acc_norm"] == 1.0))
    return items


def _harness_examples(task, n):
    """(contexts, continuations, gold index) of lm-eval's first n documents, as its task object
    builds them: a winogrande-style doc_to_text returns the gold index and the choices are
    contexts."""
    config = task.config
    out = []
    for doc in list(task.validation_docs())[:n]:
        text, choices, target = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
        if isinstance(text, int):
            contexts, continuations, gold = choices, [target] * len(choices), text
        else:
            contexts, continuations, gold = [text] * len(choices), choices, target
        if isinstance(gold, str):  # a choice's text: the harness scores its index
            gold = choices.index(gold)
        continuations = [config.target_delimiter + c for c in continuations]
        out.append((tuple(contexts), tuple(continuations), gold))
    return out


@needs_lm_eval
def test_configs_reproduce_evaluate_prompts_choices_and_gold_for_every_task(tmp_path):
    from lm_eval.tasks import TaskManager

    names = list(HARNESS_TASKS)
    paths = lm_eval_task_configs(names, tmp_path)
    assert set(paths) == set(names) and all(path.parent == tmp_path for path in paths.values())
    config = yaml.safe_load(paths["piqa"].read_text())
    assert config["include"].endswith("lm_eval/tasks/piqa/piqa.yaml")
    assert all(os.path.isfile(shard) for shard in config["dataset_kwargs"]["data_files"]["validation"])
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False).load(names)["tasks"]
    for name in names:
        ours = TASKS[name](0)
        harness_docs = list(tasks[name].validation_docs())
        assert len(harness_docs) == len(ours), name
        theirs = _harness_examples(tasks[name], 20)
        for example, (contexts, continuations, gold) in zip(ours, theirs, strict=False):
            assert example.contexts == contexts, name
            assert example.continuations == continuations, name
            assert example.gold == gold, name


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown lm-eval bridge task"):
        lm_eval_task_configs(["piqa", "mmlu"], "unused")
    with pytest.raises(ValueError, match="no task"):
        evaluate_with_lm_eval(None, None, [])
    with pytest.raises(ValueError, match="limit"):
        evaluate_with_lm_eval(None, None, "piqa", limit=0)


def test_missing_lm_eval_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install 'lm-eval"):
        evaluate_with_lm_eval(None, None, "piqa", limit=1)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@needs_lm_eval
def test_pruned_model_scores_like_our_scorer_and_the_original_is_untouched(tiny, monkeypatch):
    model, tokenizer = tiny
    for key in OFFLINE_ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    pruned = remove_layers(model, [0])
    assert len(pruned.model.layers) == len(model.model.layers) - 1
    pruned.train()
    theirs = evaluate_with_lm_eval(pruned, tokenizer, ["arc_easy"], limit=12, per_item=True)
    assert pruned.training  # HFLM's model.eval() is undone
    assert all(key not in os.environ for key in OFFLINE_ENVIRONMENT)  # restored
    ours = _our_items(pruned, tokenizer, load_task("arc_easy", limit=12))
    result = theirs["arc_easy"]
    assert result["n"] == 12
    assert result["correct"] == [acc for acc, _ in ours]
    assert result["correct_norm"] == [norm for _, norm in ours]
    assert result["acc"] == pytest.approx(sum(acc for acc, _ in ours) / 12)


@needs_lm_eval
def test_seed_none_takes_the_first_documents(tiny):
    model, tokenizer = tiny
    result = evaluate_with_lm_eval(model, tokenizer, "piqa", limit=5, seed=None, per_item=True)
    ours = _our_items(model, tokenizer, TASKS["piqa"](0)[:5])
    assert result["piqa"]["correct"] == [acc for acc, _ in ours]
    assert seeded_subset(range(10), 5) != list(range(5))  # so the two limits really differ


@needs_lm_eval
def test_llava_frozen_visual_tokens_score_text_tasks_like_dense():
    model, processor = load_model("tiny-llava")
    dense = evaluate_with_lm_eval(model, processor, ["piqa", "sciq"], limit=6, per_item=True)
    with freeze_visual_tokens(model, range(model.config.text_config.num_hidden_layers)):
        frozen = evaluate_with_lm_eval(model, processor, ["piqa", "sciq"], limit=6, per_item=True)
    assert frozen == dense
    ours = _our_items(model, processor.tokenizer, load_task("piqa", limit=6))
    assert dense["piqa"]["correct"] == [acc for acc, _ in ours]


AGREEMENT_TASKS = ("piqa", "winogrande")
AGREEMENT_ITEMS = 50


@pytest.fixture(scope="module")
def agreement(smollm2):
    """The embedded SmolLM2-135M scored by both scorers on the same seeded 50 documents."""
    model, tokenizer = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a real model, unlike the tiny ones, gains from both cores
    try:
        theirs = evaluate_with_lm_eval(
            model, tokenizer, AGREEMENT_TASKS, limit=AGREEMENT_ITEMS, batch_size=16, per_item=True
        )
        ours = {
            name: _our_items(model, tokenizer, load_task(name, limit=AGREEMENT_ITEMS))
            for name in AGREEMENT_TASKS
        }
    finally:
        torch.set_num_threads(threads)
    return theirs, ours


@needs_lm_eval
@pytest.mark.parametrize("name", AGREEMENT_TASKS)
def test_smollm2_per_item_agreement_with_lm_eval(agreement, name):
    theirs, ours = agreement
    result = theirs[name]
    assert result["n"] == AGREEMENT_ITEMS
    ours_acc = [acc for acc, _ in ours[name]]
    agree = sum(a == b for a, b in zip(result["correct"], ours_acc, strict=True))
    print(
        f"{name}: lm-eval acc {result['acc']:.3f}, ours {sum(ours_acc) / len(ours_acc):.3f}, "
        f"{agree}/{AGREEMENT_ITEMS} items agree"
    )
    assert result["correct"] == ours_acc
    if "correct_norm" in result:
        assert result["correct_norm"] == [norm for _, norm in ours[name]]
