"""The shared benchmark plumbing: the peak-memory probe and the RESULTS.md section writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import _common as C


def test_peak_memory_sees_a_freed_allocation() -> None:
    mem = C.PeakMemory()
    mem.start()
    block = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
    during = mem.current()
    del block
    peak = mem.stop()
    assert 190 * 2**20 <= during <= 260 * 2**20
    assert 190 * 2**20 <= peak <= 260 * 2**20
    assert mem.current() < 50 * 2**20  # freed again: the peak is not the current use


def test_peak_memory_start_resets_the_previous_peak() -> None:
    mem = C.PeakMemory()
    mem.start()
    block = np.ones(150 * 2**20 // 8)
    del block
    mem.start()
    small = np.ones(10 * 2**20 // 8)
    assert mem.stop() < 100 * 2**20
    del small


def test_write_section_replaces_only_its_own_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(C, "RESULTS", results)
    info = {"cpus": 2}
    C.write_section("a", "A", "first a", command="python -m x", info=info, seconds=1)
    C.write_section("b", "B", "only b", command="python -m y", info=info, seconds=2)
    C.write_section("a", "A", "second a", command="python -m x --big", info=info, seconds=3)
    text = results.read_text()
    assert text.startswith("# Benchmark results")
    assert "first a" not in text and "second a" in text and "only b" in text
    assert text.count("<!-- BEGIN a -->") == 1 and text.count("<!-- END a -->") == 1
    assert text.index("<!-- BEGIN a -->") < text.index("<!-- BEGIN b -->")  # kept in place
    assert "`python -m x --big`" in text and "cpus 2" in text


@pytest.mark.parametrize("flag", ["--quick", "--no-write"])
def test_report_prints_but_leaves_results_alone_on_smoke_runs(flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(C, "RESULTS", results)
    args = C.parser("x").parse_args([flag])
    C.report(args, "benchmarks.x", "x", "X", ["ours 2.00x faster"], "body", info={}, started=0.0)
    assert "ours 2.00x faster" in capsys.readouterr().out
    assert not results.exists()


def test_report_writes_the_headlines_above_the_body(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(C, "RESULTS", results)
    args = C.parser("x").parse_args([])
    C.report(args, "benchmarks.x", "x", "X", ["one", "two"], "the table", info={"cpus": 2}, started=0.0)
    text = results.read_text()
    assert "Headline:\n\n- one\n- two\n\nthe table\n<!-- END x -->" in text


def test_markdown_table_escapes_pipes() -> None:
    table = C.markdown_table(["name", "max |diff|"], [["x", 1]])
    assert table.splitlines()[0] == "| name | max \\|diff\\| |"
    assert table.splitlines()[1] == "| --- | ---: |"
