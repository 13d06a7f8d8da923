"""Dataset sources against real files and a real HTTP server on 127.0.0.1: listing (folder,
manifest, url_list, archive), fetching with retries and timeouts, resumable verified downloads,
and refusal of unsafe archives."""

import dataclasses
import hashlib
import io
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from emopipe.catalog import DatasetSpec
from emopipe.core.sources import Fetched, SourceError, SourceItem, fetch_items, list_items
from emopipe_tests.conftest import encode
from emopipe_tests.http_server import send

HTML = b"<!DOCTYPE html><html><body>Image not found</body></html>"


def in_memory(f: Fetched) -> Fetched:
    """A download's file read back (and removed) as data, so assertions compare bytes either way."""
    if f.file is None:
        return f
    data = f.file.read_bytes()
    f.file.unlink()
    return dataclasses.replace(f, data=data, file=None)


def by_uri(fetched):
    out = {}
    for f in fetched:
        assert f.item.uri not in out, f"{f.item.uri} yielded twice"
        out[f.item.uri] = in_memory(f)
    return out


# --- url_list and fetching ----------------------------------------------------------------------


def test_url_list_fetch_outcomes(server, tmp_path, photo_jpegs):
    jpeg = photo_jpegs["chelsea"]
    server.serve("/ok.jpg", jpeg, "image/jpeg")
    server.routes["/flaky.jpg"] = lambda h, n: send(h, 500, b"busy") if n == 1 else send(h, 200, jpeg, "image/jpeg")
    server.routes["/gone.jpg"] = lambda h, n: send(h, 403, b"forbidden")

    def slow(h, n):
        time.sleep(1.5)
        send(h, 200, jpeg, "image/jpeg")

    def trickle(h, n):  # every read arrives within the timeout, the whole response does not
        h.send_response(200)
        h.send_header("Content-Length", "4000")
        h.end_headers()
        for _ in range(40):
            h.wfile.write(b"x" * 100)
            h.wfile.flush()
            time.sleep(0.05)

    server.routes["/slow.jpg"] = slow
    server.routes["/trickle.jpg"] = trickle
    server.serve("/page.jpg", HTML, "text/html")
    names = ["ok", "missing", "flaky", "gone", "slow", "trickle", "page"]
    csv = tmp_path / "urls.csv"
    csv.write_text("url,label,votes\n" + "".join(f"{server.url(f'/{n}.jpg')},joy,{i}\n" for i, n in enumerate(names)))

    spec = DatasetSpec(name="urls", source="url_list", labels=str(csv))
    items = list_items(spec, tmp_path / "work")
    assert [i.uri for i in items] == [server.url(f"/{n}.jpg") for n in names]
    assert items[2] == SourceItem(server.url("/flaky.jpg"), "joy", {"votes": 2})

    got = by_uri(fetch_items(items, workers=4, timeout=0.5, retries=1))
    assert set(got) == {i.uri for i in items}
    result = {n: got[server.url(f"/{n}.jpg")] for n in names}
    assert result["ok"].data == jpeg and result["ok"].reason is None
    assert result["missing"].data is None and result["missing"].reason == "http_404"
    assert server.url("/missing.jpg") in result["missing"].detail
    assert server.hits["/missing.jpg"] == 1 and server.hits["/gone.jpg"] == 1  # 4xx never retried
    assert result["gone"].reason == "http_error" and "403" in result["gone"].detail
    assert result["flaky"].data == jpeg and server.hits["/flaky.jpg"] == 2
    assert result["slow"].data is None and result["slow"].reason == "timeout"
    assert server.hits["/slow.jpg"] == 2  # a timeout is retried
    assert result["trickle"].reason == "timeout"
    assert result["page"].data == HTML  # the ingest, not the fetch, rejects an HTML page
    agents = {h.get("User-Agent", "") for _, h in server.requests}
    assert all(a.startswith("emopipe/") for a in agents)


def test_url_list_downloaded_from_url(server, tmp_path, photo_jpegs):
    server.serve("/a.jpg", photo_jpegs["coffee"])
    server.serve("/list.csv", f"url,label\n{server.url('/a.jpg')},awe\n".encode(), "text/csv")
    spec = DatasetSpec(name="urls", source="url_list", url=server.url("/list.csv"))
    items = list_items(spec, tmp_path / "work")
    assert items == [SourceItem(server.url("/a.jpg"), "awe", {})]
    [fetched] = fetch_items(items, incoming=tmp_path / "incoming")
    assert fetched.file.parent == tmp_path / "incoming"
    assert in_memory(fetched).data == photo_jpegs["coffee"]


def test_url_list_errors_name_the_line(server, tmp_path):
    csv = tmp_path / "urls.csv"
    csv.write_text("url,label\nhttp://127.0.0.1:9/a.jpg,joy\n/etc/passwd,joy\n")
    with pytest.raises(SourceError, match=r"urls.csv: line 3: '/etc/passwd' is not an http\(s\) URL"):
        list_items(DatasetSpec(name="u", source="url_list", labels=str(csv)), tmp_path)
    with pytest.raises(SourceError, match="cannot download the URL list.*HTTP 404"):
        list_items(DatasetSpec(name="u", source="url_list", url=server.url("/nope.csv")), tmp_path)


def test_fetch_keeps_a_bounded_number_in_flight(tmp_path):
    files = []
    for i in range(60):
        (tmp_path / f"{i}.bin").write_bytes(bytes([i]) * 10)
        files.append(SourceItem(str(tmp_path / f"{i}.bin"), None, {}))
    taken = 0

    def lazy():
        nonlocal taken
        for item in files:
            taken += 1
            yield item

    seen = []
    for fetched in fetch_items(lazy(), workers=3):
        seen.append(fetched)
        assert taken - len(seen) <= 2 * 3, f"{taken} taken but only {len(seen)} yielded"
        time.sleep(0.002)
    assert sorted(f.data for f in seen) == sorted(bytes([i]) * 10 for i in range(60))


# --- folder -------------------------------------------------------------------------------------


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_class_per_subfolder(tmp_path, photo_jpegs, photos):
    root = tmp_path / "emotion"
    a = write(root / "joy" / "a.jpg", photo_jpegs["astronaut"])
    b = write(root / "joy" / "trip" / "day1" / "b.png", encode(photos["rocket"], "PNG"))
    c = write(root / "sadness" / "c.jpg", photo_jpegs["moon"])
    notes = write(root / "sadness" / "notes.txt", b"not an image")
    loose = write(root / "loose.jpg", photo_jpegs["coins"])
    write(root / "sadness" / ".DS_Store", b"\0\0\0\1Bud1")
    write(root / ".thumbnails" / "a.jpg", photo_jpegs["astronaut"])

    items = list_items(DatasetSpec(name="e", source="folder", path=str(root)), tmp_path / "work")
    assert {(i.uri, i.label) for i in items} == {
        (str(a), "joy"), (str(b), "joy"), (str(c), "sadness"), (str(notes), "sadness"), (str(loose), None)
    }
    got = by_uri(fetch_items(items, workers=2))
    assert got[str(b)].data == b.read_bytes() and got[str(notes)].data == b"not an image"
    assert Image.open(io.BytesIO(got[str(a)].data)).size == photos["astronaut"].shape[1::-1]


def test_folder_manifest_with_attributes(tmp_path, photo_jpegs):
    root = tmp_path / "emo"
    write(root / "img" / "1.jpg", photo_jpegs["astronaut"])
    elsewhere = write(tmp_path / "other" / "2.jpg", photo_jpegs["coffee"])
    (root / "labels.csv").write_text(
        "path,label,valence,split,id,note\n"
        "img/1.jpg,joy,0.75,train,007,\n"
        f"{elsewhere},anger,-2,test,12,far away\n"
        "./img/1.jpg,joy,0.75,train,007,\n"  # the same row again, spelled differently
        "img/gone.jpg,fear,1e-1,val,3,\n"
    )
    spec = DatasetSpec(name="emo", source="folder", path=str(root), labels="labels.csv")
    items = list_items(spec, tmp_path / "work")
    manifest = str(root / "labels.csv")
    assert items == [
        SourceItem(str(root / "img" / "1.jpg"), "joy", {"valence": 0.75, "split": "train", "id": "007", "note": None}),
        # a path outside the dataset's folder is not read; a repeated row is an input of its own
        SourceItem(str(elsewhere), None, {"reject_reason": "outside_dataset", "reject_detail": str(elsewhere)}),
        SourceItem(str(root / "img" / "gone.jpg"), "fear", {"valence": 0.1, "split": "val", "id": 3, "note": None}),
        SourceItem(f"{manifest}#line=4", None, {"reject_reason": "repeated_row",
                                                "reject_detail": f"{manifest}: line 4 repeats line 2 ({root / 'img' / '1.jpg'})"}),
    ]
    got = by_uri(fetch_items([items[0], items[2]]))
    assert got[str(root / "img" / "1.jpg")].data == photo_jpegs["astronaut"]
    gone = got[str(root / "img" / "gone.jpg")]
    assert gone.data is None and gone.reason == "missing_file" and "gone.jpg" in gone.detail


def test_folder_mistakes_are_source_errors(tmp_path):
    root = tmp_path / "emo"
    root.mkdir()
    with pytest.raises(SourceError, match=r"labels\.csv: the manifest does not exist.*path,label"):
        list_items(DatasetSpec(name="e", source="folder", path=str(root), labels="labels.csv"), tmp_path)
    (root / "labels.csv").write_text("file,emotion\na.jpg,joy\n")
    with pytest.raises(SourceError, match=r"labels\.csv: the header file,emotion lacks the column\(s\) path, label"):
        list_items(DatasetSpec(name="e", source="folder", path=str(root), labels="labels.csv"), tmp_path)
    (root / "labels.csv").write_text("path,label\na.jpg,joy\nb.jpg,fear\na.jpg,anger\n")
    with pytest.raises(SourceError, match="lines 2 and 4 both name"):
        list_items(DatasetSpec(name="e", source="folder", path=str(root), labels="labels.csv"), tmp_path)
    with pytest.raises(SourceError, match=f"the folder {tmp_path / 'nowhere'} does not exist"):
        list_items(DatasetSpec(name="e", source="folder", path=str(tmp_path / "nowhere")), tmp_path)


# --- archive ------------------------------------------------------------------------------------


def dataset_files(photo_jpegs) -> dict[str, bytes]:
    return {
        "FI/joy/a.jpg": photo_jpegs["astronaut"],
        "FI/joy/b.jpg": photo_jpegs["chelsea"],
        "FI/fear/c.jpg": photo_jpegs["moon"],
        "FI/labels.csv": b"path,label,split\njoy/a.jpg,joy,train\nfear/c.jpg,fear,test\n",
    }


def make_zip(files: dict[str, bytes], links: dict[str, str] = {}) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def make_tar(files: dict[str, bytes], links: dict[str, str] = {}, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def archive_spec(server, route: str, body: bytes, **kw) -> DatasetSpec:
    server.serve(route, body)
    return DatasetSpec(name="fi", source="archive", url=server.url(route), sha256=hashlib.sha256(body).hexdigest(), **kw)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_class_folders_and_manifest(server, tmp_path, photo_jpegs, kind):
    files = dataset_files(photo_jpegs)
    body = make_zip(files) if kind == "zip" else make_tar(files)
    work = tmp_path / "sources" / "fi"
    spec = archive_spec(server, f"/FI.{kind}", body, path="FI")
    items = list_items(spec, work)
    assert sorted((Path(i.uri).relative_to(work).parts[1:], i.label) for i in items) == [
        (("FI", "fear", "c.jpg"), "fear"), (("FI", "joy", "a.jpg"), "joy"), (("FI", "joy", "b.jpg"), "joy"),
        (("FI", "labels.csv"), None),
    ]
    got = by_uri(fetch_items(items))
    for item in items:
        assert got[item.uri].data == files["/".join(Path(item.uri).relative_to(work).parts[1:])]

    manifest = list_items(DatasetSpec(**{**spec.__dict__, "labels": "labels.csv"}), work)
    assert [(Path(i.uri).name, i.label, i.attributes) for i in manifest] == [
        ("a.jpg", "joy", {"split": "train"}), ("c.jpg", "fear", {"split": "test"})
    ]
    with pytest.raises(SourceError, match=r"'images' is not a folder inside .*; its top level holds FI/"):
        list_items(DatasetSpec(**{**spec.__dict__, "path": "images"}), work)
    assert server.hits[f"/FI.{kind}"] == 1  # the extraction is reused, not downloaded again
    assert [p.name for p in work.iterdir() if not p.name.startswith(".")] == [f"archive-{spec.sha256[:16]}"]


def test_archive_checksum_mismatch(server, tmp_path, photo_jpegs):
    body = make_zip(dataset_files(photo_jpegs))
    server.serve("/FI.zip", body)
    wrong = "0" * 64
    spec = DatasetSpec(name="fi", source="archive", url=server.url("/FI.zip"), sha256=wrong)
    work = tmp_path / "work"
    with pytest.raises(SourceError) as e:
        list_items(spec, work)
    message = str(e.value)
    assert server.url("/FI.zip") in message and wrong in message and hashlib.sha256(body).hexdigest() in message
    assert not list(work.glob("archive-*/")) and not list(work.glob("*.download"))
    [aside] = work.glob("*.sha256-mismatch")
    assert aside.read_bytes() == body


def test_archive_download_resumes_with_range(server, tmp_path, photo_jpegs):
    body = make_tar(dataset_files(photo_jpegs), mode="w")  # uncompressed: big enough to cut in half
    half = len(body) // 2

    def dropping(h, n):
        wanted = h.headers.get("Range")
        if n == 1:  # promise everything, send half, hang up
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[:half])
            return
        start = int(wanted.removeprefix("bytes=").removesuffix("-"))
        send(h, 206, body[start:], headers=[("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")])

    server.routes["/FI.tar"] = dropping
    spec = DatasetSpec(name="fi", source="archive", url=server.url("/FI.tar"), sha256=hashlib.sha256(body).hexdigest(), path="FI")
    items = list_items(spec, tmp_path / "work")
    assert len(items) == 4
    ranges = [h.get("Range") for p, h in server.requests if p == "/FI.tar"]
    assert ranges == [None, f"bytes={half}-"]


def test_archive_download_restarts_when_range_is_ignored(server, tmp_path, photo_jpegs):
    body = make_tar(dataset_files(photo_jpegs), mode="w")

    def dropping_then_full(h, n):
        if n == 1:
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 3])
        else:
            send(h, 200, body)  # ignores the Range header

    server.routes["/FI.tar"] = dropping_then_full
    spec = DatasetSpec(name="fi", source="archive", url=server.url("/FI.tar"), sha256=hashlib.sha256(body).hexdigest(), path="FI")
    assert len(list_items(spec, tmp_path / "work")) == 4
    assert server.requests[-1][1].get("Range") == f"bytes={len(body) // 3}-"


UNSAFE = {
    "zip ..": (make_zip, {"ok.jpg": b"x", "../evil.jpg": b"evil"}, {}, "climbs out"),
    "zip absolute": (make_zip, {"/tmp/evil.jpg": b"evil"}, {}, "absolute path"),
    "zip link out": (make_zip, {"ok.jpg": b"x"}, {"joy/out": "../../../outside"}, "outside the archive"),
    "tar ..": (make_tar, {"joy/../../evil.jpg": b"evil"}, {}, "climbs out"),
    "tar absolute": (make_tar, {"/tmp/evil.jpg": b"evil"}, {}, "absolute path"),
    "tar link out": (make_tar, {"ok.jpg": b"x"}, {"joy/out": "../../../outside"}, "outside|unsafe member"),
    "tar absolute link": (make_tar, {"ok.jpg": b"x"}, {"out": "/etc"}, "absolute path"),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_unsafe_archives_are_refused(server, tmp_path, case):
    make, files, links, why = UNSAFE[case]
    spec = archive_spec(server, "/bad", make(files, links))
    work = tmp_path / "a" / "b" / "work"
    with pytest.raises(SourceError, match=why) as e:
        list_items(spec, work)
    assert server.url("/bad") in str(e.value)
    assert not list(work.glob("archive-*/")) and not list(work.glob(".extracting-*"))
    assert not list(tmp_path.rglob("evil.jpg"))


def test_links_inside_an_archive_are_kept(server, tmp_path, photo_jpegs):
    spec = archive_spec(server, "/ok.tar.gz", make_tar({"joy/a.jpg": photo_jpegs["clock"]}, {"fear/a.jpg": "../joy/a.jpg"}))
    items = list_items(spec, tmp_path / "work")
    got = by_uri(fetch_items(items))
    assert sorted(i.label for i in items) == ["fear", "joy"]
    assert all(f.data == photo_jpegs["clock"] for f in got.values())


# --- synthetic ----------------------------------------------------------------------------------


def test_synthetic_items_render(tmp_path):
    synthetic = pytest.importorskip("emopipe.core.synthetic")
    spec = DatasetSpec(name="demo", source="synthetic", n_per_class=2, seed=0)
    items = list_items(spec, tmp_path)
    assert sorted({i.label for i in items}) == sorted(synthetic.MIKELS)
    assert len(items) == 2 * len(synthetic.MIKELS) and len({i.uri for i in items}) == len(items)
    got = by_uri(fetch_items(items[:4], workers=2))
    for f in got.values():
        assert f.reason is None
        Image.open(io.BytesIO(f.data)).verify()
