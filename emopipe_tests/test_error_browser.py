"""The error browser (core/error_browser.py): per class, the most confident mistakes and the least confident
correct predictions, read from real `predictions` rows, drawn from the stored image bytes."""

import numpy as np
from PIL import Image

from emopipe.core.error_browser import class_errors, write_error_pngs
from emopipe.core.evaluation import write_evaluation
from emopipe.fingerprint import sha256_bytes
from emopipe.paths import object_path

CLASSES = ["calm", "joy/fun"]  # a label with a character that must not reach a file name


def test_mistakes_by_confidence_and_unsure_hits_per_class(db, data_dir, photo_jpegs):
    ids = []
    for data in list(photo_jpegs.values())[:6]:
        image_id = sha256_bytes(data)
        path = object_path(image_id, data_dir / "objects")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        ids.append(image_id)
    labels = ["calm", "calm", "calm", "joy/fun", "joy/fun", "joy/fun"]
    joy = np.array([0.9, 0.6, 0.2, 0.95, 0.55, 0.3])  # predicted joy/fun where > 0.5
    write_evaluation(db, experiment="e", model_id="m", split_id="s", dataset="d", part="test", image_ids=ids,
                     labels=labels, scores=np.stack([1 - joy, joy], 1), classes=CLASSES, resamples=0)

    errors = {e.label: e for e in class_errors(db, model_id="m", dataset="d", part="test")}
    calm, fun = errors["calm"], errors["joy/fun"]
    assert [(e.image_id, round(e.score, 2)) for e in calm.confident_mistakes] == [(ids[0], 0.9), (ids[1], 0.6)]
    assert [(e.image_id, round(e.score, 2)) for e in calm.unsure_correct] == [(ids[2], 0.8)]
    assert [(e.image_id, e.predicted) for e in fun.confident_mistakes] == [(ids[5], "calm")]
    assert [e.image_id for e in fun.unsure_correct] == [ids[4], ids[3]]  # 0.55 before 0.95

    written = write_error_pngs(list(errors.values()), data_dir / "reports" / "errors", data_dir / "objects")
    assert set(written) == set(CLASSES)
    for path in written.values():
        assert path.parent == data_dir / "reports" / "errors"  # "joy/fun" did not make a sub-folder
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 3 * 120
