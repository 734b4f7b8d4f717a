import pytest

from shortlab.benchmarking import median_ratio, report, time_side_by_side


class FakeClock:
    """Advances only when a candidate 'works', so timings are exact and repeatable."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def work(self, seconds):
        def run():
            self.now += seconds
        return run


def test_side_by_side_alternates_and_times_each_candidate():
    clock, order = FakeClock(), []

    def candidate(name, seconds):
        def run():
            order.append(name)
            clock.now += seconds
        return run

    seconds = time_side_by_side(
        {"slow": candidate("slow", 2.0), "fast": candidate("fast", 0.5)},
        repeats=3, warmup=1, clock=clock,
    )
    assert seconds == {"slow": [2.0] * 3, "fast": [0.5] * 3}
    assert order == ["slow", "fast", "slow", "fast", "fast", "slow", "slow", "fast"]
    assert median_ratio(seconds, "slow", "fast") == pytest.approx(4.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="no candidates"):
        time_side_by_side({})
    with pytest.raises(ValueError, match="repeats"):
        time_side_by_side({"a": lambda: None}, repeats=0)


def test_report_line_format(capsys):
    assert report("speedup", 1.23456) == "speedup: 1.235"
    assert capsys.readouterr().out == "speedup: 1.235\n"


def test_reported_values_are_saved_with_their_provenance_and_tabled(tmp_path):
    import json

    from shortlab import benchmarking

    script = tmp_path / "bench_toy.py"
    script.write_text('"""Toy speed-up of A over B.\n\nMore words."""\n')
    benchmarking._REPORTED.clear()
    benchmarking.report("speedup", 1.2345678)
    benchmarking.report("seconds_a", 0.5)
    path = benchmarking.save_results(str(script), tmp_path / "results")
    saved = json.loads(path.read_text())
    assert path.name == "bench_toy.json" and saved["summary"] == "Toy speed-up of A over B."
    assert saved["values"] == {"speedup": 1.2345678, "seconds_a": 0.5}
    assert {"git_revision", "versions", "command", "hardware"} <= set(saved["provenance"])
    table = benchmarking.results_table(tmp_path / "results")
    assert "| `bench_toy.py` | Toy speed-up of A over B. | `speedup` 1.235; `seconds_a` 0.5 |" in table
    benchmarking._REPORTED.clear()
    # the document's generated block takes the table; text around it stays; a second update changes nothing
    document = tmp_path / "benchmarks.md"
    start, end = benchmarking.RESULTS_MARKERS
    document.write_text(f"# Speed\n\nbefore\n{start}\nold table\n{end}\nafter\n")
    assert benchmarking.update_results_document(document, tmp_path / "results")
    text = document.read_text()
    assert text.startswith("# Speed\n\nbefore\n") and text.endswith(f"{end}\nafter\n")
    assert benchmarking.results_block(text) == table and "old table" not in text
    assert not benchmarking.update_results_document(document, tmp_path / "results")
    (tmp_path / "plain.md").write_text("no block here\n")
    with pytest.raises(ValueError, match="no benchmark results block"):
        benchmarking.update_results_document(tmp_path / "plain.md", tmp_path / "results")
    assert (tmp_path / "plain.md").read_text() == "no block here\n"


def test_committed_benchmark_document_shows_the_saved_results():
    """docs/benchmarks.md's generated table is the one bench/results/ gives (rerun
    bench/run_all.py after measuring again)."""
    from shortlab import benchmarking
    from shortlab.plotting import repository_root

    root = repository_root()
    document = (root / "docs" / "benchmarks.md").read_text()
    block = benchmarking.results_block(document)
    if block is None:
        pytest.skip("docs/benchmarks.md has no generated results block yet")
    assert block == benchmarking.results_table(root / "bench" / "results")
