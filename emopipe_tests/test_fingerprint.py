"""table_fingerprint (Arrow) gives rows_fingerprint's digest (Python tuples), whatever the rows."""

import pyarrow as pa
import pytest

from emopipe.fingerprint import rows_fingerprint, table_fingerprint

TRICKY = [  # None, non-ASCII (UTF-8 bytes sort as code points do), ties in the first column, tabs, numbers
    ("b", "x", 3), ("a", None, 10), ("a", "é", 9), ("ä", "y", -1), ("a", "z", 9), (None, "", 0),
    ("é", "\t", 2), ("aa", "日本", 1), ("a", "é", 9), ("\U0001f600", "ok", 7), ("a", "Z", 10**15),
]


def table(rows, types=(pa.string(), pa.string(), pa.int64())) -> pa.Table:
    return pa.table([pa.array([r[k] for r in rows], t) for k, t in enumerate(types)], names=list("abn")[:len(types)])


@pytest.mark.parametrize("batch_rows", [1, 4, 1 << 16])
def test_tricky_rows_give_the_python_digest(batch_rows):
    assert table_fingerprint(table(TRICKY), batch_rows) == rows_fingerprint(TRICKY)


def test_sorted_input_and_other_string_types_give_the_same_digest():
    ids = sorted(f"{k:03d}" for k in range(300))  # the sort is skipped on a strictly increasing first column
    rows = [(i, "train" if k % 3 else None) for k, i in enumerate(ids)]
    expected = rows_fingerprint(rows)
    assert table_fingerprint(table(rows, (pa.string(), pa.string()))) == expected
    assert table_fingerprint(table(rows, (pa.large_string(), pa.string_view()))) == expected
    assert table_fingerprint(table(rows[::-1], (pa.string(), pa.string()))) == expected
    chunked = pa.concat_tables([table(rows[:100], (pa.string(), pa.string())), table(rows[100:], (pa.string(), pa.string()))])
    assert table_fingerprint(chunked, batch_rows=64) == expected


def test_numbers_sort_as_their_strings_and_a_name_may_repeat():
    rows = [(10, "a"), (9, "a"), (100, "b")]  # "10" < "100" < "9"
    t = pa.table({"n": [r[0] for r in rows], "s": [r[1] for r in rows]})
    assert table_fingerprint(t) == rows_fingerprint(rows)
    twice = pa.table([t["s"], t["s"]], names=["s", "s"])
    assert table_fingerprint(twice) == rows_fingerprint((s, s) for _, s in rows)
    assert table_fingerprint(t.slice(0, 0)) == rows_fingerprint([])


@pytest.mark.parametrize("values", [[1.0, 2.5], [True, False]])
def test_columns_that_arrow_writes_unlike_str_are_refused(values):
    with pytest.raises(TypeError, match="only strings and integers"):
        table_fingerprint(pa.table({"id": ["a", "b"], "v": values}))
