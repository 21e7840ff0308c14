"""Attention pictures: the image beside one heat-map panel per generated word.

Layout: a grid of square panels of ``panel_size`` pixels, at most ``max_columns`` per row, each with
room for a label underneath. Panel 0 is the image; panel ``i`` (1-based) shows the attention that
produced word ``i``. ``panel_boxes`` exposes this geometry so a caller (or a test) can crop a panel back
out of the picture.

Every panel shows the image squashed to a square, exactly as the encoder sees it (the model resizes
the whole image without cropping), so grid cell (row, column) of a g x g attention map covers the
same fraction of the panel as it covered of the model's input. Each map is upsampled bilinearly with
cell centres at ((k + 0.5) / g) of the side, i.e. the feature grid's own geometry. Word panels show
the image in grey so that red can only come from the overlay: the redder a pixel, the more attention.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL_SIZE = 224
MAX_COLUMNS = 5
LABEL_HEIGHT = 22
GAP = 6
# Strongest overlay opacity: the grey picture stays visible under the most attended region.
MAX_ALPHA = 0.75
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right and bottom exclusive (PIL's crop box)


def _columns(n_panels: int, max_columns: int) -> int:
    return max(1, min(n_panels, max_columns))


def panel_boxes(n_words: int, panel_size: int = PANEL_SIZE, max_columns: int = MAX_COLUMNS) -> list[Box]:
    """The picture area of every panel: the image first, then one per word (labels lie below each box)."""
    if n_words < 0:
        raise ValueError("n_words must be >= 0")
    if panel_size < 1 or max_columns < 1:
        raise ValueError("panel_size and max_columns must be positive")
    n_panels = n_words + 1
    columns = _columns(n_panels, max_columns)
    boxes = []
    for index in range(n_panels):
        row, column = divmod(index, columns)
        left = GAP + column * (panel_size + GAP)
        top = GAP + row * (panel_size + LABEL_HEIGHT + GAP)
        boxes.append((left, top, left + panel_size, top + panel_size))
    return boxes


def canvas_size(n_words: int, panel_size: int = PANEL_SIZE, max_columns: int = MAX_COLUMNS) -> tuple[int, int]:
    """(width, height) of the picture ``render_attention`` makes for a caption of ``n_words`` words."""
    n_panels = n_words + 1
    columns = _columns(n_panels, max_columns)
    rows = math.ceil(n_panels / columns)
    return GAP + columns * (panel_size + GAP), GAP + rows * (panel_size + LABEL_HEIGHT + GAP)


def upsample(attention_map: np.ndarray, size: int) -> np.ndarray:
    """A (g, g) map -> (size, size) by bilinear interpolation between cell centres (edges held constant)."""
    grid = np.ascontiguousarray(attention_map, dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def overlay(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Blend a heat map in [0, 1] over a grey picture (H, W) -> RGB uint8 (H, W, 3).

    Colour runs from yellow (little attention) to red (most), with opacity growing with the heat, so
    on a grey base the redness R - max(G, B) equals 255 * MAX_ALPHA * heat**2: monotone in the heat,
    whatever the grey level underneath.
    """
    alpha = (MAX_ALPHA * heat)[..., None]  # (H, W, 1)
    colour = np.stack([np.full_like(heat, 255.0), 255.0 * (1.0 - heat), np.zeros_like(heat)], axis=-1)  # (H, W, 3)
    base = np.repeat(grey[..., None], 3, axis=-1)  # (H, W, 3)
    return np.clip(np.rint(base * (1.0 - alpha) + colour * alpha), 0, 255).astype(np.uint8)


def _normalise(heat: np.ndarray) -> np.ndarray:
    """Stretch a map to [0, 1] so each panel shows where that word looked most, relative to elsewhere;
    a flat map (no preference) gets no overlay at all rather than a uniformly hot one."""
    low, high = float(heat.min()), float(heat.max())
    if not math.isfinite(low) or not math.isfinite(high) or high - low < 1e-8:
        return np.zeros_like(heat)
    return (heat - low) / (high - low)


def _fit_label(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int
) -> str:
    """Shorten a label with "..." until it fits under its panel."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_attention(
    image: Image.Image,
    words: list[str],
    attention: np.ndarray,
    panel_size: int = PANEL_SIZE,
    max_columns: int = MAX_COLUMNS,
) -> Image.Image:
    """The image and, for each word, its (g x g) attention map overlaid as a heat map, labelled with the word.

    ``attention`` has shape (len(words), g, g), as in ``CaptionResult.attention``.
    """
    attention = np.asarray(attention, dtype=np.float32)
    if attention.ndim != 3 or attention.shape[1] != attention.shape[2] or attention.shape[1] < 1:
        raise ValueError(f"attention must have shape (words, g, g), not {attention.shape}")
    if attention.shape[0] != len(words):
        raise ValueError(f"attention has {attention.shape[0]} maps for {len(words)} words")
    picture = image.convert("RGB").resize((panel_size, panel_size), Image.Resampling.BILINEAR)
    grey = np.asarray(picture.convert("L"), dtype=np.float32)  # (P, P)
    canvas = Image.new("RGB", canvas_size(len(words), panel_size, max_columns), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    boxes = panel_boxes(len(words), panel_size, max_columns)
    canvas.paste(picture, boxes[0][:2])
    for word, attention_map, box in zip(words, attention, boxes[1:], strict=True):
        heat = _normalise(upsample(attention_map, panel_size))
        canvas.paste(Image.fromarray(overlay(grey, heat)), box[:2])
        label = _fit_label(draw, word, font, panel_size)
        centre_x = (box[0] + box[2]) / 2
        draw.text((centre_x, box[3] + LABEL_HEIGHT / 2), label, fill=TEXT_COLOUR, font=font, anchor="mm")
    return canvas
