import pytest

from shortlab.flops import DecoderShape, flops_ratio
from shortlab.references import PAPERS, paper_numbers


@pytest.mark.parametrize("name", PAPERS)
def test_every_section_names_its_source(name):
    numbers = paper_numbers(name)
    assert "arXiv" in numbers["paper"]
    sections = {k: v for k, v in numbers.items() if k != "paper"}
    assert sections and all("arXiv" in section["source"] for section in sections.values())


def test_unknown_paper_is_named():
    with pytest.raises(ValueError, match="unknown paper 'gpt5'"):
        paper_numbers("gpt5")


def test_shortgpt_retained_shares_match_the_averages():
    rows = paper_numbers("shortgpt")["table2"]["rows"]
    dense = {r["model"]: r["average"] for r in rows if r["method"] == "dense"}
    for row in rows:
        if "retained" in row:
            assert row["average"] / dense[row["model"]] == pytest.approx(row["retained"], abs=6e-4)


def test_shortv_flops_ratio_matches_our_formula():
    # LLaVA-1.5-7B: h 4096, MLP 11008, 32 layers, 576 visual tokens; the paper's 55 % for N = 19
    row = next(r for r in paper_numbers("shortv")["table1"]["rows"]
               if r["model"] == "LLaVA-1.5-7B" and r["method"].startswith("ShortV"))
    shape = DecoderShape(num_layers=32, hidden=4096, intermediate=11008, q_dim=4096, kv_dim=4096)
    frozen = paper_numbers("shortv")["frozen_layers"]["LLaVA-1.5-7B"]
    assert len(frozen) == 19
    ratio = flops_ratio(shape, n_text=64, n_visual=576, frozen_layers=frozen)
    assert ratio == pytest.approx(row["flops_ratio"], abs=0.01)
