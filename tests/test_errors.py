"""DataError: every problem kept, the first ones shown as file:line: message, the total counted."""

from __future__ import annotations

from imlt.trainer.errors import SHOWN_PROBLEMS, DataError, Problem, parse_source


def test_message_shows_first_problems_and_the_total() -> None:
    problems = [Problem("oss://bkt/ann.txt", n, f"bad {n}") for n in range(1, 31)]
    err = DataError(problems, "read_data")
    lines = str(err).splitlines()
    assert lines[0] == "read_data: 30 problems"
    assert lines[1] == "oss://bkt/ann.txt:1: bad 1"
    assert lines[SHOWN_PROBLEMS] == f"oss://bkt/ann.txt:{SHOWN_PROBLEMS}: bad {SHOWN_PROBLEMS}"
    assert lines[-1] == f"... and {30 - SHOWN_PROBLEMS} more"
    assert len(err.problems) == 30 and isinstance(err, ValueError)


def test_errors_come_before_warnings_and_lineless_problems_print_cleanly() -> None:
    err = DataError([Problem("a.txt", 3, "odd", "warning"), Problem("classes.txt", None, "empty"), Problem("", None, "no input")])
    assert str(err).splitlines()[1:] == ["classes.txt: empty", "no input", "a.txt:3: odd"]
    assert [p.message for p in err.errors] == ["empty", "no input"]


def test_parse_source_keeps_url_colons() -> None:
    assert parse_source("oss://bkt/a/ann.txt:12") == ("oss://bkt/a/ann.txt", 12)
    assert parse_source("/data/ann.txt:1") == ("/data/ann.txt", 1)
    assert parse_source("no-line") == ("no-line", None)
