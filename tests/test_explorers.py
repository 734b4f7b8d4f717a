import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from shortlab.arch import model_parts  # noqa: E402
from shortlab.evaluate import block_nll  # noqa: E402
from shortlab.explorers import (  # noqa: E402
    model_snapshot, removal_preview, removal_preview_figure, top_next_tokens,
)
from shortlab.hooks import skip_layers  # noqa: E402
from shortlab.models import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def blocks(tiny):
    model, _ = tiny
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[3, 20:] = 0  # one padded block: its padding must not count
    return {"input_ids": ids, "attention_mask": mask}


def test_pruned_model_is_measured_on_a_copy_and_matches_skipping_the_layers(tiny, blocks):
    model, tokenizer = tiny
    model.train()  # the caller's mode must come back as it was
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    preview = removal_preview(model, tokenizer, [2, 0], PROMPT, blocks, top_k=3)
    assert preview.removed == (0, 2)
    assert preview.dense.num_layers == 4 and preview.pruned.num_layers == 2
    assert model_parts(model).num_layers == 4 and model.training
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())

    model.eval()
    with skip_layers(model, [0, 2]):
        skipped_nll, tokens = block_nll(model, blocks["input_ids"], blocks["attention_mask"])
    np.testing.assert_allclose(preview.pruned.nll, skipped_nll, rtol=1e-5)
    np.testing.assert_array_equal(preview.pruned.tokens, tokens)
    assert tokens[3] == 19 and tokens[0] == 23
    expected_ratio = np.exp((skipped_nll.sum() - preview.dense.nll.sum()) / tokens.sum())
    assert preview.ratio.estimate == pytest.approx(expected_ratio, rel=1e-5)
    assert preview.ratio.low <= preview.ratio.estimate <= preview.ratio.high


def test_top_next_tokens_are_the_softmax_of_the_last_position(tiny):
    model, tokenizer = tiny
    guesses = top_next_tokens(model, tokenizer, PROMPT, top_k=5)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        probabilities = torch.softmax(model(ids).logits[0, -1].float(), dim=-1)
    best = probabilities.topk(5)
    assert [g.text for g in guesses] == [tokenizer.decode([i]) for i in best.indices.tolist()]
    np.testing.assert_allclose([g.probability for g in guesses], best.values.numpy(), rtol=1e-5)
    assert all(a.probability >= b.probability for a, b in zip(guesses, guesses[1:]))


def test_removing_nothing_is_the_dense_model_and_a_reused_snapshot_changes_nothing(tiny, blocks):
    model, tokenizer = tiny
    dense = model_snapshot(model, tokenizer, PROMPT, blocks, top_k=3)
    unchanged = removal_preview(model, tokenizer, [], PROMPT, blocks, dense=dense, top_k=3)
    assert unchanged.pruned is dense and unchanged.ratio.estimate == pytest.approx(1.0)
    reused = removal_preview(model, tokenizer, [1], PROMPT, blocks, dense=dense, top_k=3)
    fresh = removal_preview(model, tokenizer, [1], PROMPT, blocks, top_k=3)
    np.testing.assert_allclose(reused.pruned.nll, fresh.pruned.nll, rtol=1e-6)
    assert reused.ratio.estimate == pytest.approx(fresh.ratio.estimate, rel=1e-6)


@pytest.mark.parametrize("removed,prompt,rows,error,message", [
    ([0, 1, 2, 3], PROMPT, 4, ValueError, "all 4 decoder layers"),
    ([7], PROMPT, 4, IndexError, "layer index 7 is out of range"),
    ([1], "   ", 4, ValueError, "prompt is empty"),
    ([1], PROMPT, 1, ValueError, "at least 2 blocks"),
])
def test_bad_input_is_named(tiny, blocks, removed, prompt, rows, error, message):
    model, tokenizer = tiny
    few = {name: tensor[:rows] for name, tensor in blocks.items()}
    with pytest.raises(error, match=message):
        removal_preview(model, tokenizer, removed, prompt, few)


def test_a_snapshot_of_other_blocks_is_refused(tiny, blocks):
    model, tokenizer = tiny
    dense = model_snapshot(model, tokenizer, PROMPT, {name: t[:2] for name, t in blocks.items()}, top_k=2)
    with pytest.raises(ValueError, match="not of this model and these blocks"):
        removal_preview(model, tokenizer, [1], PROMPT, blocks, dense=dense)


def test_figure_shows_both_models_predictions_and_the_removed_layers(tiny, blocks):
    model, tokenizer = tiny
    preview = removal_preview(model, tokenizer, [1, 3], PROMPT, blocks, top_k=4)
    fig = removal_preview_figure(preview, title="tiny-llama")
    try:
        ax_ppl, ax_dense, ax_pruned = fig.axes
        assert "layers removed: 1, 3" in fig._suptitle.get_text()
        for ax, snapshot in ((ax_dense, preview.dense), (ax_pruned, preview.pruned)):
            assert [t.get_text() for t in ax.get_yticklabels()] == [repr(g.text) for g in snapshot.next_tokens]
            assert [p.get_width() for p in ax.patches] == pytest.approx([g.probability for g in snapshot.next_tokens])
        assert str(preview.ratio) in ax_ppl.get_title()
    finally:
        plt.close(fig)
