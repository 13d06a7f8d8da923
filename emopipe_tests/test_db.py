"""The DuckDB file under concurrent writers: processes wait for the lock instead of failing, and
transactions are all-or-nothing."""

import subprocess
import sys
import textwrap

import pytest

from emopipe.db import Database

WRITER = textwrap.dedent("""
    import sys
    from emopipe.db import Database
    db = Database(sys.argv[1])
    for i in range(40):
        with db.transaction() as conn:
            conn.execute("INSERT INTO rejected (dataset, source_uri, reason) VALUES (?, ?, 'test')", [sys.argv[2], str(i)])
""")


def test_two_processes_writing_at_once_both_succeed(tmp_path):
    path = tmp_path / "emopipe.duckdb"
    Database(path).connect().__enter__().close()  # create the schema first
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name], stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with Database(path).connect() as conn:
        counts = dict(conn.execute("SELECT dataset, count(*) FROM rejected GROUP BY dataset").fetchall())
    assert counts == {"a": 40, "b": 40}


def test_a_failed_transaction_writes_nothing(tmp_path):
    db = Database(tmp_path / "emopipe.duckdb")
    with pytest.raises(RuntimeError):
        with db.transaction() as conn:
            conn.execute("INSERT INTO rejected (dataset, source_uri, reason) VALUES ('d', 'u', 'r')")
            raise RuntimeError("killed half-way")
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM rejected").fetchone()[0] == 0


def test_missing_table_is_reported_as_a_missing_table(tmp_path):
    db = Database(tmp_path / "emopipe.duckdb")
    with pytest.raises(Exception, match="no_such_table"):
        with db.connect() as conn:
            conn.execute("SELECT * FROM no_such_table")


def test_a_session_shares_one_connection_in_its_thread_only(tmp_path):
    import threading

    db = Database(tmp_path / "s.duckdb")
    with db.session():
        with db.connect() as a, db.transaction() as b:
            assert a is b
            b.execute("CREATE TABLE t AS SELECT 1 AS x")
        other = []
        thread = threading.Thread(target=lambda: other.append(db.connect().__enter__()))
        thread.start()
        thread.join()
        with db.connect() as c:
            assert c is a and other[0] is not a
    with db.connect() as d:
        assert d is not a and d.execute("SELECT x FROM t").fetchall() == [(1,)]
