"""`python -m emopipe.bench splits` at a small N: make_split and the DuckDB split agree with the numpy
reference for every seed it runs (the figures are for the README, not asserted here)."""

import re

from emopipe.bench.splits import main


def test_the_splits_benchmark_checks_each_seed_against_the_reference(capsys):
    assert main(["--rows", "3000", "--classes", "5", "--scheme", "70/15/15", "--repeats", "2", "--hashes", "500"]) == 0
    out = capsys.readouterr().out
    assert "identical assignment: yes" in out
    assert re.findall(r"^  seed (\d): .*split id the reference's: yes$", out, re.M) == ["0", "1"], out
    assert re.search(r"ratio numpy / make_split +[\d.]+ x +\(median of 2 runs", out), out
