"""Progress lines (emopipe/progress.py) where no terminal draws a bar: a few plain lines with percentage and
time left, then one line when done."""

import io

import emopipe.progress as progress
from emopipe.progress import Progress, format_duration, show_bars


def test_plain_lines_say_percentage_rate_and_time_left(monkeypatch):
    clock = iter(float(t) for t in range(0, 1000, 10))  # each perf_counter() call: 10 s later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    lines = []
    with Progress("text_scores: OCR", 4, "images", lines.append) as p:
        for _ in range(4):
            p.advance()
    # 2 images after 20 s (a line: 15 s since the start), 0.1 images/s, so 2 more take 20 s.
    assert lines[0] == "text_scores: OCR: 2/4 images (50 %), 0.1 images/s, about 20 s left"
    assert lines[-1].startswith("text_scores: OCR: 4/4 images in ")
    assert not any("4/4 images (" in line for line in lines)  # no progress line once done: the last line says it


def test_an_unknown_total_gives_no_line_and_no_error():
    lines = []
    with Progress("download", 0, "MB", lines.append) as p:
        p.advance(3)
    assert lines == []


def test_on_a_terminal_a_bar_is_drawn_instead_of_lines():
    terminal, lines = io.StringIO(), []
    show_bars(terminal)
    try:
        with Progress("features", 10, "images", lines.append) as p:
            p.advance(10)
    finally:
        show_bars(None)
    assert "features:   0% |" in terminal.getvalue() and " left" in terminal.getvalue()  # drawn, then cleared when done
    assert lines == ["features: 10/10 images in 0.0 s"]


def test_durations_read_as_a_person_writes_them():
    assert [format_duration(s) for s in (0.42, 12.4, 372, 3725)] == ["0.4 s", "12 s", "6 min 12 s", "1 h 02 min"]
