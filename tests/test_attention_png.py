"""Attention pictures: layout geometry, and that grid cells land on the image region they describe."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from captioner.attention_png import canvas_size, panel_boxes, render_attention, upsample

GRID = 7


def _redness(panel: Image.Image) -> np.ndarray:
    """How much redder than grey each pixel is: R - max(G, B)."""
    rgb = np.asarray(panel.convert("RGB"), dtype=np.int32)
    return rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])


def _peak_map(row: int, column: int) -> np.ndarray:
    """An attention map (summing to 1) that favours one grid cell over a noisy background."""
    rng = np.random.default_rng(row * GRID + column)
    weights = rng.uniform(0.5, 1.0, (GRID, GRID))
    weights[row, column] = 12.0
    return weights / weights.sum()


def test_panel_boxes_tile_the_canvas_without_overlap() -> None:
    for n_words in (0, 1, 4, 5, 11):
        boxes = panel_boxes(n_words, panel_size=50, max_columns=4)
        width, height = canvas_size(n_words, panel_size=50, max_columns=4)
        assert len(boxes) == n_words + 1
        occupied = np.zeros((height, width), dtype=np.int32)
        for left, top, right, bottom in boxes:
            assert (right - left, bottom - top) == (50, 50)
            assert min(left, top) >= 0 and right <= width and bottom <= height
            occupied[top:bottom, left:right] += 1
        assert occupied.max() == 1
        assert len({top for _, top, _, _ in boxes}) == -(-(n_words + 1) // 4)  # rows = ceil(panels / 4)


def test_render_has_one_panel_per_word_plus_the_image() -> None:
    image = Image.new("RGB", (90, 60), (30, 160, 90))
    words = ["a", "green", "field", "under", "sky", "today"]
    attention = np.stack([_peak_map(i, i) for i in range(len(words))])
    picture = render_attention(image, words, attention, panel_size=64)
    assert picture.size == canvas_size(len(words), panel_size=64)
    boxes = panel_boxes(len(words), panel_size=64)
    first = np.asarray(picture.crop(boxes[0]), dtype=np.int32)
    assert np.abs(first - np.array([30, 160, 90])).max() <= 1  # the image panel shows the image unchanged
    for box in boxes[1:]:
        assert _redness(picture.crop(box)).max() > 100  # every word panel carries a heat map
        left, _, right, bottom = box
        label = np.asarray(picture.crop((left, bottom, right, bottom + 20)).convert("L"))
        assert label.min() < 100  # the word is written under its panel


def test_overlay_of_the_colour_word_peaks_inside_the_named_object() -> None:
    # A grey, non-square scene with one blue square; the model would see it squashed to a square.
    width, height = 320, 240
    scene = np.full((height, width, 3), 128, dtype=np.uint8)
    object_box = (220, 30, 280, 75)  # left, top, right, bottom in scene pixels
    scene[object_box[1] : object_box[3], object_box[0] : object_box[2]] = (40, 60, 200)
    centre_x, centre_y = (object_box[0] + object_box[2]) / 2, (object_box[1] + object_box[3]) / 2
    row, column = int(centre_y / height * GRID), int(centre_x / width * GRID)  # the grid cell under the object
    assert (row, column) == (1, 5)  # off the diagonal, so swapped rows and columns would miss it

    words = ["a", "blue", "square"]
    attention = np.stack([_peak_map(5, 1), _peak_map(row, column), _peak_map(6, 6)])
    panel_size = 224
    picture = render_attention(Image.fromarray(scene), words, attention, panel_size=panel_size)
    boxes = panel_boxes(len(words), panel_size=panel_size)

    sx, sy = panel_size / width, panel_size / height
    inside = (object_box[0] * sx, object_box[1] * sy, object_box[2] * sx, object_box[3] * sy)
    redness = _redness(picture.crop(boxes[words.index("blue") + 1]))
    peak_y, peak_x = np.unravel_index(np.argmax(redness), redness.shape)
    assert inside[0] <= peak_x < inside[2] and inside[1] <= peak_y < inside[3]

    # The reddest spot follows the attention, not the object: "a" looks at cell (5, 1), far from it.
    other = _redness(picture.crop(boxes[1]))
    other_y, other_x = np.unravel_index(np.argmax(other), other.shape)
    assert not (inside[0] <= other_x < inside[2] and inside[1] <= other_y < inside[3])
    assert int(other_y * GRID / panel_size) == 5 and int(other_x * GRID / panel_size) == 1


def test_upsampling_centres_each_cell_on_its_image_region() -> None:
    for row, column in ((0, 0), (3, 6), (6, 2)):
        grid = np.zeros((GRID, GRID), dtype=np.float32)
        grid[row, column] = 1.0
        big = upsample(grid, 224)
        peak_y, peak_x = np.unravel_index(np.argmax(big), big.shape)
        assert (peak_y // 32, peak_x // 32) == (row, column)  # 224 / 7 = 32 pixels per cell


def test_a_flat_map_adds_no_colour() -> None:
    image = Image.new("RGB", (40, 40), (100, 100, 100))
    flat = np.full((1, GRID, GRID), 1 / GRID**2, dtype=np.float32)
    picture = render_attention(image, ["word"], flat, panel_size=40)
    assert _redness(picture.crop(panel_boxes(1, panel_size=40)[1])).max() == 0


def test_long_words_are_shortened_to_fit_their_panel() -> None:
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    picture = render_attention(image, ["x" * 200], _peak_map(0, 0)[None], panel_size=40)
    assert picture.size == canvas_size(1, panel_size=40)


@pytest.mark.parametrize(
    ("words", "shape"),
    [(["a", "b"], (3, GRID, GRID)), (["a"], (1, GRID, GRID - 1)), (["a"], (GRID, GRID)), (["a"], (1, 0, 0))],
)
def test_attention_of_the_wrong_shape_is_refused(words: list[str], shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="attention"):
        render_attention(Image.new("RGB", (8, 8)), words, np.ones(shape, dtype=np.float32))
