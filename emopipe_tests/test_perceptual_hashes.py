"""Perceptual hashes are computed once per image (core/perceptual_hashes.py): a re-run reads only the new
images' arrays, and the stored hashes equal the ones computed from the arrays."""

import numpy as np

from emopipe.catalog import DatasetSpec
from emopipe.core import perceptual_hashes
from emopipe.core.images import build_arrays, load_array
from emopipe.core.perceptual_hashes import image_hashes, perceptual_hash
from emopipe.core.raw_images import ingest_dataset


def ingest_and_build(db, data_dir, folder):
    spec = DatasetSpec(name="p", source="folder", path=str(folder))
    ingest_dataset(db, spec, objects_root=data_dir / "objects", work_dir=data_dir / "sources", log=lambda m: None)
    with db.connect() as conn:
        ids = [i for (i,) in conn.execute("SELECT image_id FROM images ORDER BY image_id").fetchall()]
    build_arrays(db, ids, 32, objects_root=data_dir / "objects", arrays_root=data_dir / "arrays", workers=1, log=lambda m: None)
    return ids


def test_hashes_are_stored_once_and_only_new_images_are_read(db, data_dir, tmp_path, photo_jpegs, monkeypatch):
    folder = tmp_path / "photos" / "any"
    folder.mkdir(parents=True)
    names = list(photo_jpegs)
    for name in names[:6]:
        (folder / f"{name}.jpg").write_bytes(photo_jpegs[name])
    ids = ingest_and_build(db, data_dir, folder.parent)
    first = image_hashes(db, ids)
    assert np.array_equal(first, perceptual_hash(load_array(db, ids, 32)))

    read = []
    real_load = perceptual_hashes.load_array
    monkeypatch.setattr(perceptual_hashes, "load_array", lambda db, wanted, size: (read.append(list(wanted)), real_load(db, wanted, size))[1])
    assert np.array_equal(image_hashes(db, ids[::-1]), first[::-1]) and read == []

    (folder / "new.jpg").write_bytes(photo_jpegs[names[6]])
    more = ingest_and_build(db, data_dir, folder.parent)
    new_id = next(i for i in more if i not in ids)
    hashes = image_hashes(db, more)
    assert read == [[new_id]] and len(hashes) == 7
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM perceptual_hashes").fetchone()[0] == 7
