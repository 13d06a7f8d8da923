"""The studies' dataset layouts (EmoSet, Parquet mirrors, FI, EMOTIC, WEBEmo) on small fixtures
built in the real releases' structure, read through list_items / fetch_items and the real ingest
into DuckDB; Parquet also over a real HTTP server on 127.0.0.1."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io

from emopipe.catalog import DataFile, DatasetSpec, load_catalog
from emopipe.core.sources.webemo import WEBEMO_HIERARCHY, webemo_class_map
from emopipe.core.raw_images import ingest_dataset
from emopipe.core.sources import REJECT_REASON, SourceError, fetch_items, list_items
from emopipe_tests.test_sources import in_memory

MIKELS_LABEL2IDX = {"amusement": 0, "awe": 1, "contentment": 2, "excitement": 3, "anger": 4, "disgust": 5, "fear": 6, "sadness": 7}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def ingest(db, data_dir, spec):
    result = ingest_dataset(db, spec, objects_root=data_dir / "objects", work_dir=data_dir / "sources" / spec.name, log=lambda m: None)
    assert result.balanced
    with db.connect() as conn:
        rows = conn.execute("SELECT source_uri, label, attributes FROM images WHERE dataset = ?", [spec.name]).fetchall()
        rejected = conn.execute("SELECT source_uri, reason, detail FROM rejected WHERE dataset = ?", [spec.name]).fetchall()
    return result, {uri: (label, json.loads(attrs)) for uri, label, attrs in rows}, rejected


# --- EmoSet-118K ----------------------------------------------------------------------------------


def make_emoset(root: Path, jpegs: dict[str, bytes]) -> dict[str, tuple[str, str]]:
    """The release layout: info.json, {train,val,test}.json, image/<emotion>/, annotation/<emotion>/."""
    parts = {"train": [("amusement", "astronaut"), ("sadness", "moon"), ("awe", "rocket")],
             "val": [("fear", "clock")], "test": [("sadness", "coins"), ("anger", "brick")]}
    info = {"emotion": {"label2idx": MIKELS_LABEL2IDX, "idx2label": {str(v): k for k, v in MIKELS_LABEL2IDX.items()}},
            "scene": {"label2idx": {"beach": 0}}}
    (root).mkdir(parents=True)
    (root / "info.json").write_text(json.dumps(info))
    expected = {}
    for part, entries in parts.items():
        listing = []
        for n, (emotion, photo) in enumerate(entries):
            name = f"{emotion}_{n:05d}"
            write(root / "image" / emotion / f"{name}.jpg", jpegs[photo])
            annotation = {"emotion": emotion, "brightness": 0.5 + n / 10, "colorfulness": 0.3, "scene": "beach",
                          "object": ["person", "dog"], "facial_expression": "happy"}
            if photo != "brick":  # an image whose annotation file is missing keeps its label
                write(root / "annotation" / emotion / f"{name}.json", json.dumps(annotation).encode())
            listing.append([emotion, name, f"image/{emotion}/{name}.jpg", f"annotation/{emotion}/{name}.json"])
            expected[str(root / "image" / emotion / f"{name}.jpg")] = (emotion, part)
        (root / f"{part}.json").write_text(json.dumps(listing))
    return expected


def test_emoset_release_layout(tmp_path, db, data_dir, photo_jpegs):
    root = tmp_path / "EmoSet-118K"
    expected = make_emoset(root, photo_jpegs)
    spec = DatasetSpec(name="emoset", source="emoset", path=str(root), classes=tuple(MIKELS_LABEL2IDX))
    items = list_items(spec, tmp_path / "work")
    assert {i.uri: (i.label, i.attributes["split"]) for i in items} == expected
    moon = next(i for i in items if i.uri.endswith("sadness_00001.jpg"))
    assert moon.attributes == {"split": "train", "emoset_id": "sadness_00001", "brightness": 0.6, "colorfulness": 0.3,
                               "scene": "beach", "object": "person;dog", "facial_expression": "happy"}
    brick = next(i for i in items if i.label == "anger")
    assert brick.attributes == {"split": "test", "emoset_id": "anger_00001"}

    result, rows, rejected = ingest(db, data_dir, spec)
    assert (result.n_images, rejected) == (6, [])
    assert {uri: (label, attrs["split"]) for uri, (label, attrs) in rows.items()} == expected
    with db.connect() as conn:  # what split: official reads
        parts = dict(conn.execute("SELECT attributes ->> '$.split', count(*) FROM images WHERE dataset = 'emoset' GROUP BY 1").fetchall())
    assert parts == {"train": 3, "val": 1, "test": 2}


def test_emoset_mistakes_name_the_file(tmp_path, photo_jpegs):
    root = tmp_path / "EmoSet"
    make_emoset(root, photo_jpegs)
    (root / "val.json").write_text(json.dumps([["joy", "joy_0", "image/joy/joy_0.jpg", "annotation/joy/joy_0.json"]]))
    with pytest.raises(SourceError, match=r"val\.json: entry 0 has emotion 'joy', not in info\.json"):
        list_items(DatasetSpec(name="e", source="emoset", path=str(root)), tmp_path)
    (root / "val.json").write_text(json.dumps([["fear", "x", "../../etc/passwd", "a.json"]]))
    items = list_items(DatasetSpec(name="e", source="emoset", path=str(root)), tmp_path)
    escaped = [i for i in items if i.attributes.get(REJECT_REASON) == "outside_dataset"]
    assert [(i.label, i.attributes["reject_detail"]) for i in escaped] == [(None, "../../etc/passwd")]
    (root / "info.json").unlink()
    with pytest.raises(SourceError, match=r"info\.json: does not exist"):
        list_items(DatasetSpec(name="e", source="emoset", path=str(root)), tmp_path)


# --- Parquet (Hugging Face mirrors) ---------------------------------------------------------------


def hf_parquet(path: Path, rows: list[tuple[bytes, int, str]], names: list[str] | None, binary: bool = False) -> Path:
    """A file as `datasets` writes it: image struct {bytes, path}, ClassLabel int, schema metadata."""
    images = [b for b, _, _ in rows]
    image = pa.array(images, pa.binary()) if binary else pa.StructArray.from_arrays(
        [pa.array(images, pa.binary()), pa.array([f"{i}.jpg" for i in range(len(rows))])], names=["bytes", "path"])
    table = pa.table({"image": image, "label": pa.array([lab for _, lab, _ in rows], pa.int64()),
                      "emoset_id": [i for _, _, i in rows], "brightness": [0.1 * n for n in range(len(rows))],
                      "tags": [["x"]] * len(rows)})
    if names is not None:
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=2)  # several row groups, as in real mirrors
    return path


NAMES = list(MIKELS_LABEL2IDX)  # EmoSet's label2idx order: amusement, awe, contentment, ...


def parquet_fixture(tmp_path, photo_jpegs):
    train = [(photo_jpegs[p], lab, f"id_{p}") for p, lab in [("astronaut", 0), ("chelsea", 1), ("coffee", 7), ("rocket", 3), ("camera", 4)]]
    test = [(photo_jpegs[p], lab, f"id_{p}") for p, lab in [("coins", 7), ("moon", 6)]]
    a = hf_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", train, NAMES)
    b = hf_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", test, NAMES)
    expected = {i: (NAMES[lab], part) for part, rows in (("train", train), ("test", test)) for _, lab, i in rows}
    return a, b, expected, train + test


def test_parquet_local_files(tmp_path, db, data_dir, photo_jpegs):
    a, b, expected, rows = parquet_fixture(tmp_path, photo_jpegs)
    spec = DatasetSpec(name="emoset_pq", source="parquet", files=(DataFile(str(a)), DataFile(str(b))))
    items = list_items(spec, tmp_path / "work")
    assert {i.attributes["emoset_id"]: (i.label, i.attributes["split"]) for i in items} == expected
    assert items[1].uri == f"parquet:{a}#0:1" and items[2].uri == f"parquet:{a}#1:0"
    assert items[2].attributes == {"emoset_id": "id_coffee", "brightness": pytest.approx(0.2), "split": "train"}  # list column dropped
    fetched = {f.item.attributes["emoset_id"]: in_memory(f).data
               for f in fetch_items(items, workers=4, spec=spec, work_dir=tmp_path / "work")}
    assert fetched == {i: data for data, _, i in rows}

    result, stored, rejected = ingest(db, data_dir, spec)
    assert (result.n_images, rejected) == (7, [])
    assert {attrs["emoset_id"]: (label, attrs["split"]) for label, attrs in stored.values()} == expected


def test_parquet_over_http_with_and_without_checksum(server, tmp_path, db, data_dir, photo_jpegs):
    a, b, expected, _ = parquet_fixture(tmp_path, photo_jpegs)
    server.serve("/default/train/0000.parquet", a.read_bytes())
    server.serve("/default/test/0000.parquet", b.read_bytes())
    files = (DataFile(server.url("/default/train/0000.parquet"), hashlib.sha256(a.read_bytes()).hexdigest()),
             DataFile(server.url("/default/test/0000.parquet")))
    spec = DatasetSpec(name="emoset_hf", source="parquet", files=files)
    result, stored, rejected = ingest(db, data_dir, spec)
    assert (result.n_images, rejected) == (7, [])
    assert {attrs["emoset_id"]: (label, attrs["split"]) for label, attrs in stored.values()} == expected
    assert all(uri.startswith(f"parquet:{server.url('/default/')}") for uri in stored)
    list_items(spec, data_dir / "sources" / spec.name)  # again: the downloads are reused
    assert server.hits == {"/default/train/0000.parquet": 1, "/default/test/0000.parquet": 1}

    wrong = DatasetSpec(name="bad", source="parquet", files=(DataFile(files[1].location, "0" * 64),))
    with pytest.raises(SourceError, match="sha256 mismatch"):
        list_items(wrong, tmp_path / "bad")


def test_parquet_binary_column_string_labels_and_names(tmp_path, photo_jpegs):
    plain = hf_parquet(tmp_path / "plain.parquet", [(photo_jpegs["grass"], 1, "g"), (photo_jpegs["gravel"], 0, "v")], None, binary=True)
    with pytest.raises(SourceError, match="holds integers and the file names no classes; give the class names"):
        list_items(DatasetSpec(name="p", source="parquet", files=(DataFile(str(plain)),)), tmp_path)
    spec = DatasetSpec(name="p", source="parquet", files=(DataFile(str(plain)),), classes=("calm", "rough"))
    items = list_items(spec, tmp_path)
    assert [(i.label, "split" in i.attributes) for i in items] == [("rough", False), ("calm", False)]
    # fetching needs the dataset's spec and work dir (where its files are), nothing the listing kept in memory
    fetched = fetch_items(items, spec=spec, work_dir=tmp_path)
    assert [in_memory(f).data for f in sorted(fetched, key=lambda f: f.item.uri)] == [photo_jpegs["grass"], photo_jpegs["gravel"]]

    named = tmp_path / "named.parquet"
    pq.write_table(pa.table({"img": [photo_jpegs["grass"]], "emotion": ["awe"], "split": ["val"]}), named)
    spec = DatasetSpec(name="n", source="parquet", files=(DataFile(str(named)),), image_column="img", label_column="emotion")
    [item] = list_items(spec, tmp_path)
    assert (item.label, item.attributes) == ("awe", {"split": "val"})
    with pytest.raises(SourceError, match=r"has no column 'label'; its columns: img, emotion, split"):
        list_items(DatasetSpec(name="n", source="parquet", files=(DataFile(str(named)),), image_column="img"), tmp_path)


# --- FI: folder and URL list ----------------------------------------------------------------------


def test_fi_folder_and_url_list_read_the_same_labels(server, tmp_path, db, data_dir, photo_jpegs):
    files = {"amusement/a1.jpg": "astronaut", "amusement/a2.jpg": "coffee", "fear/f1.jpg": "moon", "sadness/s1.jpg": "clock"}
    root = tmp_path / "FI" / "emotion_dataset"
    lines = ["url,label"]
    for rel, photo in files.items():
        write(root / rel, photo_jpegs[photo])
        server.serve(f"/fi/{rel}", photo_jpegs[photo], "image/jpeg")
        lines.append(f"{server.url('/fi/' + rel)},{rel.split('/')[0]}")
    (tmp_path / "fi_urls.csv").write_text("\n".join(lines) + "\n")
    catalog = load_catalog()
    mikels = catalog.dataset("fi").classes
    folder = DatasetSpec(name="fi", source="folder", path=str(root), classes=mikels)
    urls = DatasetSpec(name="fi_urls", source="url_list", labels=str(tmp_path / "fi_urls.csv"), classes=mikels)
    ingest(db, data_dir, folder)
    ingest(db, data_dir, urls)
    with db.connect() as conn:
        pairs = {d: sorted(conn.execute("SELECT image_id, label FROM images WHERE dataset = ?", [d]).fetchall()) for d in ("fi", "fi_urls")}
    assert len(pairs["fi"]) == 4 and pairs["fi"] == pairs["fi_urls"]
    assert sorted(label for _, label in pairs["fi"]) == ["amusement", "amusement", "fear", "sadness"]


# --- EMOTIC ---------------------------------------------------------------------------------------


def struct_array(records: list[dict]) -> np.ndarray:
    """A Matlab 1xN struct array (savemat writes a list of dicts as a cell array instead)."""
    out = np.empty((1, len(records)), dtype=[(k, object) for k in records[0]])
    for i, record in enumerate(records):
        for k, v in record.items():
            out[0, i][k] = v
    return out


def cells(values: list[str]) -> np.ndarray:
    out = np.empty((1, len(values)), dtype=object)
    out[0, :] = values
    return out


def train_person(bbox, vad, categories):
    return {"body_bbox": np.array(bbox, float), "annotations_categories": {"categories": cells(categories)},
            "annotations_continuous": dict(zip(("valence", "arousal", "dominance"), vad)), "gender": "Male", "age": "Adult"}


def held_out_person(bbox, vads, categories):
    """val/test persons: several annotators plus the combined (mean) rating, as released."""
    mean = np.mean(vads, axis=0)
    return {"body_bbox": np.array(bbox, float),
            "annotations_categories": struct_array([{"categories": cells(categories)} for _ in vads]),
            "combined_categories": cells(categories),
            "annotations_continuous": struct_array([dict(zip(("valence", "arousal", "dominance"), v)) for v in vads]),
            "combined_continuous": dict(zip(("valence", "arousal", "dominance"), mean)), "gender": "Female", "age": "Kid"}


def image_entry(filename, folder, persons, width=640, height=480):
    return {"filename": filename, "folder": folder, "image_size": {"n_col": width, "n_row": height},
            "original_database": {"name": "mscoco"}, "person": struct_array(persons)}


def make_emotic(root: Path, jpegs: dict[str, bytes]) -> Path:
    for folder, name, photo in [("mscoco/images", "one.jpg", "astronaut"), ("mscoco/images", "two.jpg", "chelsea"),
                                ("emodb_small/images", "val.jpg", "coffee"), ("framesdb/images", "test.jpg", "rocket"),
                                ("ade20k/images", "nan.jpg", "camera")]:
        write(root / "emotic" / folder / name, jpegs[photo])
    train = struct_array([
        image_entry("one.jpg", "mscoco/images", [train_person([64, 48, 320, 480], [7, 4, 10], ["Happiness", "Engagement"])]),
        image_entry("two.jpg", "mscoco/images", [train_person([0, 0, 10, 10], [5, 5, 5], ["Peace"]),
                                                  train_person([20, 20, 40, 40], [5, 5, 5], ["Fatigue"])]),
        image_entry("nan.jpg", "ade20k/images", [train_person([0, 0, 10, 10], [math.nan, math.nan, math.nan], ["Peace"])]),
    ])
    val = struct_array([image_entry("val.jpg", "emodb_small/images", [held_out_person([100, 0, 300, 200], [[1, 10, 4], [3, 8, 6]], ["Fear"])], 400, 200)])
    test = struct_array([image_entry("test.jpg", "framesdb/images", [held_out_person([-3, 10, 512, 300], [[10, 1, 1]], ["Pleasure"])], 512, 400)])
    path = root / "Annotations" / "Annotations.mat"
    path.parent.mkdir(parents=True)
    scipy.io.savemat(path, {"train": train, "val": val, "test": test})
    return path


EMOTIC_EXPECTED = {
    "mscoco/images/one.jpg": {"box_x1": 0.1, "box_y1": 0.1, "box_x2": 0.5, "box_y2": 1.0, "valence": 6 / 9, "arousal": 3 / 9,
                              "dominance": 1.0, "categories": "Engagement;Happiness", "gender": "Male", "age": "Adult", "split": "train"},
    "emodb_small/images/val.jpg": {"box_x1": 0.25, "box_y1": 0.0, "box_x2": 0.75, "box_y2": 1.0, "valence": 1 / 9, "arousal": 8 / 9,
                                   "dominance": 4 / 9, "categories": "Fear", "gender": "Female", "age": "Kid", "split": "val"},
    "framesdb/images/test.jpg": {"box_x1": 0.0, "box_y1": 0.025, "box_x2": 1.0, "box_y2": 0.75, "valence": 1.0, "arousal": 0.0,
                                 "dominance": 0.0, "categories": "Pleasure", "gender": "Female", "age": "Kid", "split": "test"},
}


def check_emotic(items, root: Path):
    kept = {str(Path(i.uri).relative_to(root)): i for i in items if i.label is not None}
    assert set(kept) == set(EMOTIC_EXPECTED)
    for rel, want in EMOTIC_EXPECTED.items():
        got = kept[rel].attributes
        assert kept[rel].label == "person" and set(got) == set(want), rel
        for key, value in want.items():
            assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), (rel, key)
    refused = {str(Path(i.uri).relative_to(root)): i.attributes[REJECT_REASON] for i in items if i.label is None}
    assert refused == {"mscoco/images/two.jpg": "multiple_persons", "ade20k/images/nan.jpg": "no_continuous_labels"}


def test_emotic_annotations_mat(tmp_path, db, data_dir, photo_jpegs):
    mat = make_emotic(tmp_path / "EMOTIC", photo_jpegs)
    root = tmp_path / "EMOTIC" / "emotic"
    spec = DatasetSpec(name="emotic", source="emotic", path=str(root), labels=str(mat))
    check_emotic(list_items(spec, tmp_path / "work"), root)

    result, rows, rejected = ingest(db, data_dir, spec)
    assert result.n_images == 3
    assert {str(Path(u).relative_to(root)): a["split"] for u, (_, a) in rows.items()} == {
        "mscoco/images/one.jpg": "train", "emodb_small/images/val.jpg": "val", "framesdb/images/test.jpg": "test"}
    assert sorted((str(Path(u).relative_to(root)), r) for u, r, _ in rejected) == [
        ("ade20k/images/nan.jpg", "no_continuous_labels"), ("mscoco/images/two.jpg", "multiple_persons")]


def test_emotic_converted_csvs(tmp_path, photo_jpegs):
    make_emotic(tmp_path / "EMOTIC", photo_jpegs)
    root = tmp_path / "EMOTIC" / "emotic"
    header = "Index,Folder,Filename,Image Size,BBox,Categorical_Labels,Continuous_Labels,Gender,Age\n"
    csvs = tmp_path / "emotic_pre"
    csvs.mkdir()
    (csvs / "train.csv").write_text(header + "".join([
        '0,mscoco/images,one.jpg,"[640, 480]","[64, 48, 320, 480]","[\'Engagement\', \'Happiness\']","[7, 4, 10]",Male,Adult\n',
        '1,mscoco/images,two.jpg,"[640, 480]","[0, 0, 10, 10]","[\'Peace\']","[5, 5, 5]",Male,Adult\n',
        '2,mscoco/images,two.jpg,"[640, 480]","[20, 20, 40, 40]","[\'Fatigue\']","[5, 5, 5]",Male,Adult\n',
        '3,ade20k/images,nan.jpg,"[640, 480]","[0, 0, 10, 10]","[\'Peace\']","[]",Male,Adult\n']))
    (csvs / "val.csv").write_text(header + '0,emodb_small/images,val.jpg,"[400, 200]","[100, 0, 300, 200]","[\'Fear\']","[2.0, 9.0, 5.0]",Female,Kid\n')
    (csvs / "test.csv").write_text(header + '0,framesdb/images,test.jpg,"[512, 400]","[-3, 10, 512, 300]","[\'Pleasure\']","[10, 1, 1]",Female,Kid\n')
    check_emotic(list_items(DatasetSpec(name="e", source="emotic", path=str(root), labels=str(csvs)), tmp_path), root)
    (csvs / "val.csv").write_text("Folder,Filename\nx,y\n")
    with pytest.raises(SourceError, match=r"val\.csv: the header Folder,Filename lacks Image Size, BBox, Continuous_Labels"):
        list_items(DatasetSpec(name="e", source="emotic", path=str(root), labels=str(csvs)), tmp_path)


# --- WEBEmo ---------------------------------------------------------------------------------------


def test_webemo_url_lists_and_sadness_map(server, tmp_path, db, data_dir, photo_jpegs):
    index = {fine: i for i, (fine, _, _) in enumerate(WEBEMO_HIERARCHY)}
    train = [("a.jpg", "sadness", "astronaut"), ("b.jpg", "neglect", "chelsea"), ("c.jpg", "cheerfullness", "coffee")]
    test = [("d.jpg", "confusion", "rocket"), ("e.jpg", "sympathy", "moon")]
    root = tmp_path / "WEBEmo"
    root.mkdir()
    for name, rows in (("train25.txt", train), ("test25.txt", test)):
        for file, _, photo in rows:
            server.serve(f"/img/{file}", photo_jpegs[photo], "image/jpeg")
        (root / name).write_text("".join(f"{server.url('/img/' + f)} {index[fine]}\n" for f, fine, _ in rows))
    builtin = load_catalog().dataset("webemo")
    assert builtin.class_map == webemo_class_map("sadness")
    spec = DatasetSpec(name="webemo", source="webemo", path=str(root), classes=builtin.classes, class_map=builtin.class_map)
    items = list_items(spec, tmp_path / "work")
    assert items[3].label == "confusion" and items[3].attributes == {"emotion7": "confusion", "polarity": "negative", "split": "test"}
    assert items[1].attributes == {"emotion7": "sadness", "polarity": "negative", "split": "train"}

    result, rows, rejected = ingest(db, data_dir, spec)
    assert (result.n_images, rejected) == (5, [])
    assert {uri.rsplit("/", 1)[1]: label for uri, (label, _) in rows.items()} == {
        "a.jpg": "sadness", "b.jpg": "sadness", "c.jpg": "others", "d.jpg": "others", "e.jpg": "sadness"}
    (root / "test25.txt").write_text(f"{server.url('/img/x.jpg')} 25\n")
    with pytest.raises(SourceError, match=r"test25\.txt: line 1: expected '<http\(s\) url> <label index 0..24>'"):
        list_items(spec, tmp_path / "work")


# --- The built-in study entries -------------------------------------------------------------------


def test_builtin_study_entries():
    import timm

    import emopipe.core.models  # noqa: F401  registers FractalNet in timm

    catalog = load_catalog()
    sources = {name: catalog.dataset(name).source for name in
               ("emoset", "emoset_parquet", "fi", "fi_urls", "emotic", "webemo", "unbiasedemo", "emotion6")}
    assert sources == {"emoset": "emoset", "emoset_parquet": "parquet", "fi": "folder", "fi_urls": "url_list",
                       "emotic": "emotic", "webemo": "webemo", "unbiasedemo": "folder", "emotion6": "emotion6"}
    references = {}
    for name in ("emoset_vit", "fi_resnet32", "fi_probe32", "fi_probe32_lr1e4", "fi_fractalnet32", "emotic_bbox_vad",
                 "webemo_sadness_b0", "webemo_sadness_b2",
                 "webemo_sadness_s", "webemo_sadness_xception", "webemo_sadness_xception_scratch"):
        exp = catalog.experiment(name)
        assert timm.is_model(exp.model), exp.model
        references[name] = exp.reference and exp.reference.value
    assert references == {"emoset_vit": 78.40, "fi_resnet32": 58.3, "fi_probe32": 18.0, "fi_probe32_lr1e4": 18.0,
                          "fi_fractalnet32": 13.0, "emotic_bbox_vad": 0.043,
                          "webemo_sadness_b0": 74.14, "webemo_sadness_b2": 74.18, "webemo_sadness_s": 75.57,
                          "webemo_sadness_xception": 72.53, "webemo_sadness_xception_scratch": 63.53}
    emotic = catalog.experiment("emotic_bbox_vad")
    assert emotic.targets == ("box_x1", "box_y1", "box_x2", "box_y2", "valence", "arousal", "dominance")
    assert emotic.split == catalog.experiment("emoset_vit").split == "official"
    assert catalog.experiment("webemo_sadness_xception_scratch").pretrained == "none"
    assert [e.dataset for e in catalog.experiment("webemo_sadness_s").eval_datasets] == ["unbiasedemo", "emotion6"]


@pytest.mark.parametrize("entry, message", [
    ({"source": "parquet"}, r"datasets\.x\.files: a parquet dataset needs 'files'"),
    ({"source": "parquet", "files": [{"url": "ftp://h/a.parquet"}]}, r"files\[0\]\.url: 'ftp://h/a\.parquet' is not an http\(s\) URL"),
    ({"source": "parquet", "files": [{"path": "a.parquet", "sha256": "abc"}]}, r"files\[0\]\.sha256: expected the file's 64-hex-digit"),
    ({"source": "parquet", "files": [{"path": "a", "url": "http://h/a"}]}, r"files\[0\]: give exactly one of 'url'"),
    ({"source": "emotic", "path": "/nowhere"}, r"datasets\.x\.labels: an emotic dataset needs 'labels'"),
    ({"source": "webemo"}, r"datasets\.x\.path: source webemo needs 'path'"),
    ({"source": "emoset"}, r"datasets\.x\.path: source emoset needs 'path'"),
])
def test_catalog_checks_the_format_keys(tmp_path, entry, message):
    from emopipe.catalog import CatalogError

    file = tmp_path / "catalog.yaml"
    file.write_text(json.dumps({"datasets": {"x": entry}}))
    with pytest.raises(CatalogError, match=message):
        load_catalog(file)
    ok = {"source": "parquet", "files": ["http://h/train.parquet", {"path": "rel/test.parquet", "sha256": "a" * 64}]}
    file.write_text(json.dumps({"datasets": {"x": ok}}))
    assert load_catalog(file).dataset("x").files == (DataFile("http://h/train.parquet"), DataFile("rel/test.parquet", "a" * 64))
