"""The synthetic demo source: deterministic, varied, learnable but not trivially, and text ground truth
that both real text engines (PP-OCR, the default, and EasyOCR) agree with."""

import io
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from emopipe.catalog import TextThresholds
from emopipe.core.synthetic import MAX_SIDE, MIKELS, MIN_SIDE, PHRASES, SyntheticError, render, synthetic_listing
from emopipe.core.text_engines import text_engine
from emopipe.errors import UserError

N_PER_CLASS = 60  # 8 x 60 images: enough for the learnability check, a few seconds to render


@pytest.fixture(scope="module")
def listing() -> list[tuple[str, str, dict]]:
    return synthetic_listing(N_PER_CLASS, seed=0)


@pytest.fixture(scope="module")
def rendered(listing) -> dict[str, bytes]:
    return {uri: render(uri) for uri, _, _ in listing}


@pytest.fixture
def one_thread():
    """Torch on one thread for this test (other test processes share the cores), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_listing_is_deterministic_and_balanced():
    first = synthetic_listing(100, seed=0)
    assert first == synthetic_listing(100, seed=0)
    assert Counter(label for _, label, _ in first) == {label: 100 for label in MIKELS}
    assert len({uri for uri, _, _ in first}) == 800
    assert first[7][0] == "synthetic://seed0/amusement/0007." + first[7][0].rsplit(".", 1)[1]
    assert [uri for uri, _, _ in synthetic_listing(100, seed=1)] != [uri for uri, _, _ in first]


def test_listing_marks_everything_synthetic_and_text_is_ten_percent():
    listing = synthetic_listing(100, seed=3)
    for uri, label, attributes in listing:
        assert re.fullmatch(rf"synthetic://seed3/{label}/\d{{4}}\.(jpg|png)", uri)
        assert attributes["synthetic"] is True
        assert attributes["has_text"] == (attributes["text"] is not None)
        assert attributes["text"] is None or attributes["text"] in PHRASES
    per_class = Counter(label for _, label, attributes in listing if attributes["has_text"])
    assert per_class == {label: 10 for label in MIKELS}
    assert len({attributes["text"] for _, _, attributes in listing if attributes["has_text"]}) > 10
    extensions = Counter(uri.rsplit(".", 1)[1] for uri, _, _ in listing)
    assert 0.15 < extensions["png"] / len(listing) < 0.45


def test_listing_subset_of_classes_gives_the_same_images():
    full = synthetic_listing(20, seed=0)
    subset = synthetic_listing(20, seed=0, classes=("fear", "awe"))
    assert len(subset) == 40 and all(entry in full for entry in subset)


def test_render_is_a_pure_function_of_the_uri(listing):
    picks = [listing[0][0], listing[1][0]]
    picks += [next(uri for uri, _, _ in listing if uri.endswith(".png"))]
    picks += [next(uri for uri, _, a in listing if a["has_text"])]
    for uri in picks:
        assert render(uri) == render(uri)
    other_seed = synthetic_listing(1, seed=1, classes=("amusement",))[0][0]
    assert _rgb(render(other_seed)).tobytes() != _rgb(render(listing[0][0])).tobytes()


def test_images_decode_with_varied_sizes_and_both_formats(listing, rendered):
    sizes = set()
    for uri, _, _ in listing:
        image = Image.open(io.BytesIO(rendered[uri]))
        assert image.format == ("PNG" if uri.endswith(".png") else "JPEG"), uri
        assert image.mode == "RGB"
        assert MIN_SIDE <= image.width <= MAX_SIDE and MIN_SIDE <= image.height <= MAX_SIDE, (uri, image.size)
        sizes.add(image.size)
        image.load()
    widths, heights = {w for w, _ in sizes}, {h for _, h in sizes}
    assert len(sizes) > len(listing) // 2
    assert min(widths) < 260 and max(widths) > 580 and min(heights) < 260 and max(heights) > 580
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_bad_classes_and_uris_are_user_errors(listing):
    with pytest.raises(UserError, match="joy"):
        synthetic_listing(5, classes=("amusement", "joy"))
    with pytest.raises(SyntheticError, match="not a synthetic image URI"):
        render("synthetic://seed0/joy/0001.jpg")
    with pytest.raises(SyntheticError, match="not a synthetic image URI"):
        render("file:///tmp/x.jpg")
    uri = listing[0][0]
    other = uri[:-3] + ("png" if uri.endswith("jpg") else "jpg")
    with pytest.raises(SyntheticError, match="listed as"):
        render(other)
    with pytest.raises(SyntheticError, match="listed as"):
        render(uri.replace("/0000.", "/0."))


@pytest.mark.usefixtures("one_thread")
def test_class_is_learnable_by_a_linear_model_on_32px_pixels_but_not_trivially(listing, rendered):
    pixels = np.stack([np.asarray(_rgb(rendered[uri]).resize((32, 32), Image.Resampling.BILINEAR))
                       for uri, _, _ in listing])
    x = torch.tensor(pixels.reshape(len(listing), -1), dtype=torch.float32) / 255
    y = torch.tensor([MIKELS.index(label) for _, label, _ in listing])
    test = torch.arange(len(y)) % 4 == 0  # every 4th index of each class: a stratified 25 % held out
    train = ~test
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-3)

    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], len(MIKELS))  # multinomial logistic regression, L2-penalised
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[train]), y[train]) + model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    chance = 1 / len(MIKELS)
    assert 2 * chance < accuracy < 0.9, accuracy


def _contains(read: str, phrase: str) -> bool:
    """OCR may split or slightly misread; count it as found when most of the phrase's words are read."""
    read_words = set(re.findall(r"[a-z]+", read.lower()))
    words = phrase.lower().split()
    return sum(word in read_words for word in words) >= max(1, len(words) - 1)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("engine", ["ppocr", pytest.param("easyocr", marks=pytest.mark.slow)])
def test_real_ocr_reads_the_text_images_and_nothing_in_the_others(engine, listing, rendered, tmp_path):
    """Both text engines, as the OCR stage feeds them (whole image, longer side at the engine's OCR size)."""
    module = text_engine(engine)
    reader = module.make_reader("cpu", tmp_path, "fp32", 1)
    with_text = [(uri, a["text"]) for uri, _, a in listing if a["has_text"]][::3][:8]
    without = [uri for uri, _, a in listing if not a["has_text"]][::53][:8]
    assert len(with_text) == 8 and len(without) == 8

    def read(uri: str) -> list[tuple[str, float]]:
        image = _rgb(rendered[uri])
        scale = module.DEFAULT_OCR_SIZE / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        return [(text, confidence) for _, text, confidence in reader.readtext(np.asarray(image))]

    for uri, phrase in with_text:
        confident = [text for text, confidence in read(uri) if confidence > 0.4]
        assert _contains(" ".join(confident), phrase), (uri, phrase, confident)
    for uri in without:  # a lone confident character (PP-OCR reads an "8" into two circles) is no text
        confident = "".join(text for text, confidence in read(uri) if confidence > 0.4)
        assert sum(ch.isascii() and ch.isalnum() for ch in confident) < TextThresholds.min_chars, (uri, confident)
