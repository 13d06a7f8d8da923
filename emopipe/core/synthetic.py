"""The `synthetic` dataset source: SYNTHETIC demo images of the 8 Mikels emotion classes, made on the fly.

Each class is a distribution over colours, shapes and textures that overlaps the others, so the class is
learnable but not trivially. About 10 % of the images carry a rendered English phrase, recorded as ground
truth for the text filter. Everything about one image follows from RNGs seeded by (seed, class, index):
the listing draws the cheap decisions (format, text) first, and render() replays the same draws, so
render(uri) is a pure function of the URI and always agrees with the listing.
"""

import colorsys
import io
import math
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from emopipe.errors import UserError

MIKELS: tuple[str, ...] = ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness")

# Bump when the drawing changes for the same URI: the ingest then renders every synthetic image again
# instead of trusting what it stored (core/source_entries.py).
RENDER_VERSION = 1
SCHEME = "synthetic://"
TEXT_BLOCK = 10  # one image in ten carries text
PNG_FRACTION = 0.30
MIN_SIDE, MAX_SIDE = 200, 640
MAX_ASPECT = 1.6
# Chance that an image takes its colours / shapes / background from another class: the overlap that keeps
# the task from being trivial for a linear model on pixels.
BORROW = {"colour": 0.15, "shape": 0.2, "background": 0.3}

# Short, common phrases (signs, memes, greetings): short enough to stay large on a 200 px wide image.
PHRASES = (
    "SALE TODAY", "I miss you", "OPEN", "STOP", "Thank you", "FREE ENTRY", "Good morning", "Love you",
    "BIG NEWS", "Welcome home", "DANGER", "Keep calm", "HAPPY BIRTHDAY", "Best friends", "GAME OVER",
    "Hello world", "NO PARKING", "Sweet dreams", "Call me", "EXIT", "Good luck", "Coffee time",
    "Stay strong", "WINNER",
)

_URI = re.compile(r"^synthetic://seed(\d+)/([a-z]+)/(\d+)\.(jpg|png)$")


class SyntheticError(UserError):
    """A synthetic class name or URI that this generator does not know."""


@dataclass(frozen=True)
class _Style:
    hue: float  # centre, degrees
    hue_spread: float  # standard deviation, degrees
    saturation: tuple[float, float]
    value: tuple[float, float]
    background: str  # gradient | clouds | mottled | vignette
    shape: str  # circles | stars | peaks | ellipses | blobs | confetti | shards | drops
    n_shapes: tuple[int, int]
    blur: tuple[float, float]  # blur radius, in % of the shorter side
    grain: float  # amplitude of per-pixel noise, grey levels


STYLES: dict[str, _Style] = {
    "amusement": _Style(45, 18, (0.6, 1.0), (0.8, 1.0), "clouds", "circles", (3, 8), (0.0, 0.0), 4),
    "anger": _Style(0, 14, (0.7, 1.0), (0.5, 0.9), "gradient", "stars", (1, 4), (0.0, 0.0), 8),
    "awe": _Style(225, 22, (0.4, 0.8), (0.5, 0.95), "gradient", "peaks", (1, 3), (0.0, 0.0), 3),
    "contentment": _Style(110, 25, (0.3, 0.6), (0.6, 0.9), "clouds", "ellipses", (2, 5), (1.5, 3.0), 2),
    "disgust": _Style(70, 18, (0.4, 0.7), (0.3, 0.6), "mottled", "blobs", (2, 4), (0.0, 0.0), 14),
    "excitement": _Style(310, 35, (0.7, 1.0), (0.7, 1.0), "gradient", "confetti", (10, 22), (0.0, 0.0), 4),
    "fear": _Style(260, 35, (0.2, 0.5), (0.1, 0.35), "vignette", "shards", (2, 5), (0.0, 0.0), 12),
    "sadness": _Style(210, 18, (0.05, 0.3), (0.35, 0.65), "clouds", "drops", (2, 6), (0.5, 1.5), 5),
}


def synthetic_listing(n_per_class: int = 100, seed: int = 0,
                      classes: tuple[str, ...] = MIKELS) -> list[tuple[str, str, dict]]:
    """[(uri, label, attributes)] for every image, without rendering any."""
    unknown = [c for c in classes if c not in STYLES]
    if unknown:
        raise SyntheticError(f"synthetic dataset: unknown classes {unknown}; allowed: {list(MIKELS)}")
    listing = []
    for label in classes:
        for index in range(n_per_class):
            _, ext, text = _plan(seed, label, index)
            attributes = {"synthetic": True, "has_text": text is not None, "text": text}
            listing.append((_uri(seed, label, index, ext), label, attributes))
    return listing


def render(uri: str) -> bytes:
    """The encoded image (JPEG or PNG, as the extension says) for a URI from synthetic_listing()."""
    match = _URI.match(uri)
    if match is None or match[2] not in STYLES:
        raise SyntheticError(f"not a synthetic image URI: {uri!r} (expected synthetic://seed0/amusement/0007.jpg)")
    seed, label, index = int(match[1]), match[2], int(match[3])
    rng, ext, text = _plan(seed, label, index)
    if uri != (listed := _uri(seed, label, index, ext)):
        raise SyntheticError(f"synthetic image {uri!r} is not in the listing; it is listed as {listed!r}")
    image = _draw(rng, label, text)
    buf = io.BytesIO()
    if ext == "jpg":
        image.save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
    else:
        image.save(buf, format="PNG", compress_level=1)  # level 1: fast, and these are demo files
    return buf.getvalue()


def _uri(seed: int, label: str, index: int, ext: str) -> str:
    return f"synthetic://seed{seed}/{label}/{index:04d}.{ext}"


def _plan(seed: int, label: str, index: int) -> tuple[np.random.Generator, str, str | None]:
    """The image's RNG, after it has drawn what the listing needs: the format and the text (or None)."""
    # crc32, not hash(): stable across processes, and independent of the order of `classes`.
    class_key = zlib.crc32(label.encode())
    rng = np.random.default_rng([seed, class_key, index])
    ext = "png" if rng.random() < PNG_FRACTION else "jpg"
    phrase = PHRASES[int(rng.integers(len(PHRASES)))]
    # Exactly one image in each block of TEXT_BLOCK carries text (not a coin flip per image), so a class of
    # 100 has 10. The extra seed element keeps this stream apart from the per-image ones.
    block = index // TEXT_BLOCK
    has_text = np.random.default_rng([seed, class_key, block, TEXT_BLOCK]).integers(TEXT_BLOCK) == index % TEXT_BLOCK
    return rng, ext, phrase if has_text else None


def _draw(rng: np.random.Generator, label: str, text: str | None) -> Image.Image:
    aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
    width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    height = int(np.clip(round(width * aspect), MIN_SIDE, MAX_SIDE))
    own = STYLES[label]

    def borrowed(part: str) -> _Style:
        return STYLES[MIKELS[int(rng.integers(len(MIKELS)))]] if rng.random() < BORROW[part] else own

    colour, shape, background = borrowed("colour"), borrowed("shape"), borrowed("background")
    image = _BACKGROUNDS[background.background](rng, colour, width, height)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(shape.n_shapes[0], shape.n_shapes[1] + 1))):
        _SHAPES[shape.shape](rng, draw, colour, width, height)
    radius = rng.uniform(*own.blur) * min(width, height) / 100
    if radius > 0:
        image = image.filter(ImageFilter.BoxBlur(radius))  # a box blur: a third of a Gaussian's time
    pixels = np.asarray(image, dtype=np.int16)
    grain = rng.integers(-own.grain, own.grain + 1, size=(height, width, 1), dtype=np.int16)
    image = Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))
    if text is not None:
        _draw_text(rng, image, text)
    return image


# ---- colours -------------------------------------------------------------------------------------------

def _colour(rng: np.random.Generator, style: _Style) -> tuple[int, int, int]:
    hue = (style.hue + rng.normal(0, style.hue_spread)) % 360 / 360
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(*style.saturation), rng.uniform(*style.value))
    return tuple(int(255 * c) for c in rgb)


def _background_colour(rng: np.random.Generator, style: _Style) -> tuple[int, int, int]:
    """Half the time the class palette, half the time any colour: backgrounds are noise, not signal."""
    if rng.random() < 0.5:
        return _colour(rng, style)
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.8), rng.uniform(0.15, 1)))


# ---- backgrounds: small numpy grids resized up (cheap, and smooth, so nothing looks like glyphs) --------

def _upscale(grid: np.ndarray, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)


def _gradient(rng, style, width, height):
    start, end = np.array(_background_colour(rng, style)), np.array(_background_colour(rng, style))
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:1:16j, 0:1:16j]
    t = (xs * math.cos(angle) + ys * math.sin(angle))
    t = (t - t.min()) / (t.max() - t.min())
    return _upscale(start + t[..., None] * (end - start), width, height)


def _clouds(rng, style, width, height):
    n = int(rng.integers(3, 7))
    grid = np.array([[_background_colour(rng, style) for _ in range(n)] for _ in range(n)], dtype=float)
    return _upscale(grid, width, height)


def _mottled(rng, style, width, height):
    n = int(rng.integers(10, 20))
    base = np.array(_background_colour(rng, style), dtype=float)
    grid = base + rng.normal(0, 35, size=(n, n, 1)) + rng.normal(0, 12, size=(n, n, 3))
    return _upscale(grid, width, height)


def _vignette(rng, style, width, height):
    centre = np.array(_background_colour(rng, style), dtype=float)
    ys, xs = np.mgrid[-1:1:24j, -1:1:24j]
    cx, cy = rng.uniform(-0.4, 0.4, size=2)
    falloff = np.clip(1 - 0.8 * np.hypot(xs - cx, ys - cy), 0.1, 1)
    return _upscale(centre * falloff[..., None], width, height)


_BACKGROUNDS = {"gradient": _gradient, "clouds": _clouds, "mottled": _mottled, "vignette": _vignette}


# ---- shapes: filled and large relative to the image, so none reads as a letter --------------------------

def _polygon(cx, cy, radii, rotation):
    n = len(radii)
    return [(cx + r * math.cos(rotation + 2 * math.pi * k / n), cy + r * math.sin(rotation + 2 * math.pi * k / n))
            for k, r in enumerate(radii)]


def _centre(rng, width, height):
    return rng.uniform(0, width), rng.uniform(0, height)


def _circles(rng, draw, style, width, height):
    cx, cy = _centre(rng, width, height)
    r = rng.uniform(0.06, 0.2) * min(width, height)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_colour(rng, style))


def _stars(rng, draw, style, width, height):
    cx, cy = _centre(rng, width, height)
    outer = rng.uniform(0.15, 0.35) * min(width, height)
    spikes = int(rng.integers(5, 10))
    radii = [outer * (rng.uniform(0.8, 1.1) if k % 2 == 0 else rng.uniform(0.4, 0.55)) for k in range(2 * spikes)]
    draw.polygon(_polygon(cx, cy, radii, rng.uniform(0, math.pi)), fill=_colour(rng, style))


def _peaks(rng, draw, style, width, height):
    base = rng.uniform(0.3, 0.8) * width
    x = rng.uniform(-0.2, 1.0) * width
    top = (x + base * rng.uniform(0.3, 0.7), height * rng.uniform(0.15, 0.6))
    draw.polygon([(x, height), top, (x + base, height)], fill=_colour(rng, style))


def _ellipses(rng, draw, style, width, height):
    cx, cy = _centre(rng, width, height)
    rx, ry = rng.uniform(0.15, 0.4) * width, rng.uniform(0.08, 0.2) * height
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_colour(rng, style))


def _blobs(rng, draw, style, width, height):
    cx, cy = _centre(rng, width, height)
    mean = rng.uniform(0.12, 0.3) * min(width, height)
    # Smooth radial noise: a few low harmonics, so the outline is lumpy but never spiky.
    angles = np.linspace(0, 2 * math.pi, 32, endpoint=False)
    wobble = sum(rng.uniform(0, 0.2) * np.cos(k * angles + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4))
    draw.polygon(_polygon(cx, cy, list(mean * (1 + wobble)), 0.0), fill=_colour(rng, style))


def _confetti(rng, draw, style, width, height):
    cx, cy = _centre(rng, width, height)
    r = rng.uniform(0.04, 0.08) * min(width, height)
    sides = int(rng.integers(3, 7))
    radii = [r] * (sides if sides < 6 else 24)  # 6 means a disc
    draw.polygon(_polygon(cx, cy, radii, rng.uniform(0, math.pi)), fill=_colour(rng, style))


def _shards(rng, draw, style, width, height):
    cx, cy = _centre(rng, width, height)
    size = rng.uniform(0.15, 0.35) * min(width, height)
    radii = list(size * rng.uniform(0.5, 1.0, size=int(rng.integers(4, 7))))
    draw.polygon(_polygon(cx, cy, radii, rng.uniform(0, math.pi)), fill=_colour(rng, style))


def _drops(rng, draw, style, width, height):
    cx, cy = _centre(rng, width, height)
    r = rng.uniform(0.05, 0.12) * min(width, height)
    fill = _colour(rng, style)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    draw.polygon([(cx - r * 0.97, cy - r * 0.25), (cx, cy - 2.6 * r), (cx + r * 0.97, cy - r * 0.25)], fill=fill)


_SHAPES = {"circles": _circles, "stars": _stars, "peaks": _peaks, "ellipses": _ellipses, "blobs": _blobs,
           "confetti": _confetti, "shards": _shards, "drops": _drops}


# ---- text -------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _font_file() -> str | None:
    """DejaVu Sans Bold from matplotlib's package data; None means Pillow's built-in scalable font."""
    try:
        import matplotlib
    except ImportError:
        return None
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    return str(path) if path.exists() else None


@lru_cache(maxsize=256)
def _font(size: int) -> ImageFont.FreeTypeFont:
    path = _font_file()
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)


def _lines(phrase: str) -> str:
    """Long phrases on two lines, so the letters can stay large on narrow images."""
    words = phrase.split()
    if len(phrase) <= 8 or len(words) == 1:
        return phrase
    cut = min(range(1, len(words)), key=lambda i: abs(len(" ".join(words[:i])) - len(" ".join(words[i:]))))
    return " ".join(words[:cut]) + "\n" + " ".join(words[cut:])


def _draw_text(rng: np.random.Generator, image: Image.Image, phrase: str) -> None:
    """The phrase, large (letters >= ~8 % of the longer side) and high-contrast: an OCR must read it."""
    width, height = image.size
    text = _lines(phrase)
    size = int(rng.uniform(0.11, 0.15) * max(width, height))
    draw = ImageDraw.Draw(image)
    while True:  # shrink until the block fits in 90 % of the width and 60 % of the height
        left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=_font(size), align="center")
        if (right - left <= 0.9 * width and bottom - top <= 0.6 * height) or size <= 12:
            break
        size -= 2
    font = _font(size)
    box_w, box_h = right - left, bottom - top
    x = rng.uniform(0.05 * width, width - box_w - 0.05 * width) if width - box_w > 0.1 * width else (width - box_w) / 2
    y = rng.uniform(0.05 * height, height - box_h - 0.05 * height)
    dark = rng.random() < 0.5
    ink, paper = ((20, 20, 20), (245, 245, 235)) if dark else ((255, 255, 255), (25, 25, 30))
    if rng.random() < 0.6:  # a banner behind the text, like a sign or a caption
        pad = 0.25 * size
        draw.rectangle((x - pad, y - pad, x + box_w + pad, y + box_h + pad), fill=paper)
        draw.multiline_text((x - left, y - top), text, font=font, fill=ink, align="center")
    else:  # outlined letters straight on the picture, like a meme caption
        draw.multiline_text((x - left, y - top), text, font=font, fill=ink, align="center",
                            stroke_width=max(2, size // 14), stroke_fill=paper)
