"""A captioned real-photo set for measuring text detection: real photographs that ship inside installable
packages (scikit-image's `skimage.data`, matplotlib's sample data), each cut into several crops, and every
crop twice: clean, and with text laid over it the way photos on the web carry it (a caption banner, meme
lettering, a faint watermark, a sign, or bare text in a colour of the photo's own), at 1/9 to 1/25 of the
shorter side, at different places. Deterministic for a seed.

The base photos are the ones without text of their own, so a clean crop's ground truth is "no text": skimage's
`text`, `page` and logo are left out, and so are the motorcycle (labels on the garage shelves) and the astronaut
(her name tag reads COLLINS: both engines read it).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SKIMAGE_PHOTOS = ("chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
                  "coins", "moon", "grass", "gravel", "brick", "retina", "clock", "cell")
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf",
         "DejaVuSans-Oblique.ttf")
STYLES = ("caption", "meme", "watermark", "sign", "bare")
WORDS = ("sale", "today", "love", "you", "never", "give", "up", "happy", "birthday", "free", "open", "monday",
         "coffee", "first", "best", "friends", "forever", "photo", "by", "news", "breaking", "when", "your", "cat",
         "sees", "the", "weekend", "stop", "parking", "only", "summer", "vibes", "2024", "limited", "offer", "call",
         "now", "motivation", "dream", "big", "miss", "every", "day", "welcome", "home", "exit", "good", "morning")


@dataclass(frozen=True)
class CaptionedPhoto:
    name: str  # <photo>-<crop>-clean or <photo>-<crop>-<style>
    jpeg: bytes
    has_text: bool
    text: str | None = None


def base_photos() -> dict[str, np.ndarray]:
    """The real photographs, name -> HxWx3 uint8, all from package data (no download)."""
    import matplotlib
    from skimage import data

    photos = {}
    for name in SKIMAGE_PHOTOS:
        arr = getattr(data, name)()
        photos[name] = np.ascontiguousarray(np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]).astype(np.uint8)
    for file in MATPLOTLIB_PHOTOS:
        with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / file) as img:
            photos[Path(file).stem] = np.asarray(img.convert("RGB"))
    return photos


def captioned_photos(crops_per_photo: int = 8, seed: int = 0) -> list[CaptionedPhoto]:
    """Every crop clean and with one overlay, the styles taken in turn so each is used about equally."""
    rng = random.Random(seed)
    out = []
    for photo_name, arr in sorted(base_photos().items()):
        for n in range(crops_per_photo):
            crop = _crop(Image.fromarray(arr), rng, whole=n == 0)
            style = STYLES[(len(out) // 2) % len(STYLES)]
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            text = text.upper() if style in ("meme", "sign") or rng.random() < 0.3 else text.capitalize()
            out.append(CaptionedPhoto(f"{photo_name}-{n}-clean", _jpeg(crop, rng), False))
            out.append(CaptionedPhoto(f"{photo_name}-{n}-{style}", _jpeg(_overlay(crop, style, text, rng), rng), True, text))
    return out


def _crop(img: Image.Image, rng: random.Random, whole: bool) -> Image.Image:
    """A random crop (35-100 % of each side; the whole photo for the first), longer side resized to 320-800 px."""
    if not whole:
        w, h = round(img.width * rng.uniform(0.35, 1.0)), round(img.height * rng.uniform(0.35, 1.0))
        x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
        img = img.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = rng.randint(320, 800) / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)


def _font(rng: random.Random, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / rng.choice(FONTS)), size)


def _fitted_font(draw: ImageDraw.ImageDraw, text: str, rng: random.Random, height: int, max_width: int):
    """A font whose capital height is about `height` px, shrunk until the text fits max_width."""
    font = _font(rng, max(8, round(height * 1.4)))
    while draw.textlength(text, font=font) > max_width and font.size > 8:
        font = font.font_variant(size=font.size - 1)
    return font


def _overlay(img: Image.Image, style: str, text: str, rng: random.Random) -> Image.Image:
    img = img.convert("RGBA")
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    short = min(img.size)
    height = round(short / rng.uniform(9, 25) if style != "watermark" else short / rng.uniform(14, 25))
    font = _fitted_font(draw, text, rng, height, int(img.width * 0.9))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    margin = max(4, short // 40)
    if style == "caption":  # a banner along the top or bottom edge, dark or light, the text in the opposite shade
        dark = rng.random() < 0.7
        y = margin if rng.random() < 0.4 else img.height - th - 3 * margin
        draw.rectangle((0, y - margin, img.width, y + th + margin), fill=(0, 0, 0, 220) if dark else (255, 255, 255, 220))
        x = (img.width - tw) // 2 if rng.random() < 0.6 else margin
        draw.text((x - left, y - top), text, font=font, fill="white" if dark else "black")
    elif style == "meme":  # white capitals with a black outline, top or bottom, centred
        y = margin if rng.random() < 0.5 else img.height - th - 2 * margin
        draw.text(((img.width - tw) // 2 - left, y - top), text, font=font, fill="white",
                  stroke_width=max(1, font.size // 12), stroke_fill="black")
    elif style == "watermark":  # small, half transparent, in a corner
        x = margin if rng.random() < 0.5 else img.width - tw - margin
        y = margin if rng.random() < 0.3 else img.height - th - margin
        shade = 255 if _luminance(img, (x, y, x + tw, y + th)) < 128 else 0
        draw.text((x - left, y - top), text, font=font, fill=(shade, shade, shade, rng.randint(140, 200)))
    elif style == "sign":  # a coloured plate anywhere in the frame, lettering in white or black
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        x, y = rng.randint(0, max(0, img.width - tw - 2 * margin)), rng.randint(0, max(0, img.height - th - 2 * margin))
        draw.rectangle((x, y, x + tw + 2 * margin, y + th + 2 * margin), fill=colour + (255,))
        ink = "black" if sum(colour) / 3 > 128 else "white"
        draw.text((x + margin - left, y + margin - top), text, font=font, fill=ink)
    else:  # bare text in a random colour, kept readable: at least 80 grey levels from what lies under it
        x, y = rng.randint(0, max(0, img.width - tw)), rng.randint(0, max(0, img.height - th))
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        under = _luminance(img, (x, y, x + tw, y + th))
        if abs(sum(colour) / 3 - under) < 80:
            colour = (255, 255, 255) if under < 128 else (0, 0, 0)
        draw.text((x - left, y - top), text, font=font, fill=colour + (255,))
    return Image.alpha_composite(img, layer).convert("RGB")


def _luminance(img: Image.Image, box: tuple[int, int, int, int]) -> float:
    return float(np.asarray(img.convert("L").crop(box)).mean())


def _jpeg(img: Image.Image, rng: random.Random) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=rng.randint(80, 95))
    return buf.getvalue()
