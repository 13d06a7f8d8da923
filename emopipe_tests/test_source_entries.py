"""Incremental ingest (core/source_entries.py): an unchanged entry is not read again, a changed file is,
and a url_list re-run downloads nothing it already knows; against real files, a real DuckDB file and a
real HTTP server on 127.0.0.1."""

import builtins
import os
from pathlib import Path

import pytest

from emopipe.catalog import DatasetSpec
from emopipe.core.raw_images import ingest_dataset
from emopipe.fingerprint import sha256_bytes
from emopipe_tests.http_server import send


@pytest.fixture
def folder(tmp_path, photo_jpegs) -> Path:
    root = tmp_path / "photos"
    names = list(photo_jpegs)
    for n, name in enumerate(names[:8]):
        path = root / ("happy" if n % 2 else "sad") / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photo_jpegs[name])
    (root / "sad" / "cut.jpg").write_bytes(photo_jpegs[names[8]][:2000])
    (root / "sad" / "notes.txt").write_bytes(b"not an image")
    (root / "happy" / "copy.jpg").write_bytes(photo_jpegs[names[1]])
    return root


def ingest(db, data_dir, spec):
    return ingest_dataset(db, spec, objects_root=data_dir / "objects", work_dir=data_dir / "sources", log=lambda m: None)


def opened_under(root: Path, monkeypatch) -> list[str]:
    """Every path under `root` that Python opens from now on (builtins.open and os.open)."""
    seen, real_open, real_os_open = [], builtins.open, os.open

    def watch(path):
        if isinstance(path, (str, Path)) and str(path).startswith(str(root)):
            seen.append(str(path))

    monkeypatch.setattr(builtins, "open", lambda file, *a, **kw: (watch(file), real_open(file, *a, **kw))[1])
    monkeypatch.setattr(os, "open", lambda path, *a, **kw: (watch(path), real_os_open(path, *a, **kw))[1])
    return seen


def rows(db, sql):
    with db.connect() as conn:
        return sorted(conn.execute(sql).fetchall())


def test_an_unchanged_folder_is_not_read_again(db, data_dir, folder, monkeypatch):
    spec = DatasetSpec(name="mine", source="folder", path=str(folder))
    first = ingest(db, data_dir, spec)
    assert (first.n_images, first.n_rejected, first.n_duplicates, first.n_known) == (8, 2, 1, 0)
    before = rows(db, "SELECT * EXCLUDE (ingested_at) FROM images"), rows(db, "SELECT * EXCLUDE (rejected_at) FROM rejected")

    opened = opened_under(folder, monkeypatch)
    again = ingest(db, data_dir, spec)
    assert opened == []
    assert (again.n_images, again.n_rejected, again.n_duplicates, again.n_known, again.n_new) == (8, 2, 1, 11, 0)
    assert again.fingerprint == first.fingerprint and again.balanced
    assert before[0] == rows(db, "SELECT * EXCLUDE (ingested_at) FROM images")
    reasons = rows(db, "SELECT source_uri, reason FROM rejected")
    assert [(Path(u).name, r) for u, r in reasons] == [("cut.jpg", "truncated"), ("notes.txt", "not_an_image")]


def test_a_changed_file_is_read_again_and_its_old_bytes_leave_the_dataset(db, data_dir, folder, photo_jpegs):
    spec = DatasetSpec(name="mine", source="folder", path=str(folder))
    ingest(db, data_dir, spec)
    target = folder / "sad" / "astronaut.jpg"
    old_id = sha256_bytes(target.read_bytes())
    target.write_bytes(photo_jpegs["brick"])  # other bytes under the same path
    repaired = folder / "sad" / "cut.jpg"
    repaired.write_bytes(photo_jpegs["clock"])  # the truncated file, now whole
    result = ingest(db, data_dir, spec)
    assert (result.n_known, result.n_new, result.n_images, result.n_rejected) == (9, 2, 9, 1)
    ids = {Path(uri).name: image_id for uri, image_id in rows(db, "SELECT source_uri, image_id FROM images")}
    assert ids["astronaut.jpg"] == sha256_bytes(photo_jpegs["brick"]) and old_id not in ids.values()
    assert ids["cut.jpg"] == sha256_bytes(photo_jpegs["clock"])


def test_entries_are_known_by_size_and_mtime_not_by_reading(db, data_dir, folder, photo_jpegs):
    """The rule is (path, size, mtime_ns): bytes swapped behind an unchanged stat are not noticed, as
    documented (this shows that nothing is read), and touching the file makes them noticed."""
    spec = DatasetSpec(name="mine", source="folder", path=str(folder))
    ingest(db, data_dir, spec)
    target = folder / "sad" / "astronaut.jpg"
    st, old_id = target.stat(), sha256_bytes(target.read_bytes())
    swapped = bytearray(target.read_bytes())
    swapped[-3] ^= 0xFF  # a byte of the entropy-coded data: still a whole JPEG of the same size
    target.write_bytes(bytes(swapped))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    ingest(db, data_dir, spec)
    assert old_id in {i for (i,) in rows(db, "SELECT image_id FROM images")}
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    ingest(db, data_dir, spec)
    assert sha256_bytes(bytes(swapped)) in {i for (i,) in rows(db, "SELECT image_id FROM images")}


def test_entries_that_left_the_listing_are_forgotten(db, data_dir, folder):
    spec = DatasetSpec(name="mine", source="folder", path=str(folder))
    ingest(db, data_dir, spec)
    (folder / "sad" / "notes.txt").unlink()
    (folder / "happy" / "copy.jpg").unlink()
    ingest(db, data_dir, spec)
    names = {Path(u).name for (u,) in rows(db, "SELECT source_uri FROM source_entries")}
    assert len(names) == 9 and "notes.txt" not in names and "copy.jpg" not in names


def url_list(server, tmp_path, paths: list[str], **kw) -> DatasetSpec:
    listing = tmp_path / "urls.csv"
    listing.write_text("url,label\n" + "".join(f"{server.url(p)},happy\n" for p in paths))
    return DatasetSpec(name="urls", source="url_list", labels=str(listing), **kw)


def test_a_url_list_rerun_downloads_nothing_it_knows(db, data_dir, server, tmp_path, photo_jpegs):
    names = list(photo_jpegs)[:4]
    for name in names:
        server.serve(f"/{name}.jpg", photo_jpegs[name], "image/jpeg")
    server.routes["/gone.jpg"] = lambda h, n: send(h, 403, b"forbidden")
    spec = url_list(server, tmp_path, [f"/{n}.jpg" for n in names] + ["/dead.jpg", "/gone.jpg"])

    first = ingest(db, data_dir, spec)
    assert first.n_images == 4 and first.rejected_by_reason == {"http_404": 1, "http_error": 1}
    hits = dict(server.hits)
    again = ingest(db, data_dir, spec)
    assert server.hits == hits  # no request at all: the images are known, the 404 and 403 not retried
    assert again.n_known == 6 and again.fingerprint == first.fingerprint
    detail = dict(rows(db, "SELECT reason, detail FROM rejected"))["http_404"]
    assert "dead.jpg" in detail and "retry_failed_urls" in detail

    retried = ingest(db, data_dir, url_list(server, tmp_path, [f"/{n}.jpg" for n in names] + ["/dead.jpg", "/gone.jpg"],
                                           retry_failed_urls=True))
    assert server.hits["/dead.jpg"] == hits["/dead.jpg"] + 1 and server.hits["/gone.jpg"] == hits["/gone.jpg"] + 1
    assert all(server.hits[f"/{n}.jpg"] == 1 for n in names)  # the images are still not downloaded again
    assert retried.n_known == 4 and retried.rejected_by_reason == {"http_404": 1, "http_error": 1}


def test_a_busy_server_is_tried_again_on_the_next_run(db, data_dir, server, tmp_path, photo_jpegs):
    """A 503 that outlasts the download's own retries is the server's moment, not the URL's fault."""
    busy = [("Retry-After", "0")]
    server.routes["/busy.jpg"] = lambda h, n: send(h, 200, photo_jpegs["coins"]) if n > 4 else send(h, 503, b"", headers=busy)
    spec = url_list(server, tmp_path, ["/busy.jpg"])
    first = ingest(db, data_dir, spec)
    assert first.rejected_by_reason == {"http_error": 1} and server.hits["/busy.jpg"] == 4
    second = ingest(db, data_dir, spec)
    assert second.n_images == 1 and second.n_known == 0 and server.hits["/busy.jpg"] == 5


def test_a_synthetic_rerun_renders_nothing_until_the_generator_changes(db, data_dir, monkeypatch):
    from emopipe.core import source_entries, synthetic

    spec = DatasetSpec(name="gen", source="synthetic", n_per_class=2, seed=1)
    first = ingest(db, data_dir, spec)
    rendered, real_render = [], synthetic.render
    monkeypatch.setattr(synthetic, "render", lambda uri: (rendered.append(uri), real_render(uri))[1])
    again = ingest(db, data_dir, spec)
    assert rendered == [] and (again.n_known, again.n_images) == (16, 16) and again.fingerprint == first.fingerprint

    monkeypatch.setattr(source_entries, "RENDER_VERSION", synthetic.RENDER_VERSION + 1)  # as after a change to the drawing
    redrawn = ingest(db, data_dir, spec)
    assert len(rendered) == 16 and redrawn.n_known == 0 and redrawn.fingerprint == first.fingerprint
