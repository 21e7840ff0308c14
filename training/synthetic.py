"""Synthetic scenes: coloured shapes on a plain background, with captions whose truth is known.

Real caption data cannot tell whether a model names what it sees; these scenes can. Every image
holds 1 to 3 non-overlapping objects (circle, square or triangle; red, green, blue or yellow; small
or large) and five captions that name each object's colour and shape, counts where objects repeat,
and, where it is clear, where one object is relative to another. ``training.scenes`` checks model
captions against the stored objects.

Objects are large next to the encoder's 32-pixel feature cells (small ones are at least 40 px at
224, more than a cell, so every object covers a cell centre), and colours are saturated against grey,
white or beige backgrounds, so a 7x7 feature grid can both recognise and locate them.

Output follows the Karpathy split format of COCO and Flickr (``dataset.json`` beside ``images/``),
so the same loaders read synthetic and real data. Generation is deterministic: image ``i`` depends
only on the seed and ``i`` (not on ``count``), so a larger set extends a smaller one and no image
ever changes split.

    python -m training.synthetic --out data/synthetic --count 5000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioner.vocab import tokenize
from training.scenes import (
    COLOURS,
    INVERSE_RELATION,
    SHAPES,
    SIZE_WORDS,
    Relation,
    SceneObject,
    is_clear,
    relation_between,
)

CAPTIONS_PER_IMAGE = 5
JPEG_QUALITY = 92  # how the scenes are stored; models trained on them expect its artefacts
MAX_CAPTION_WORDS = 16
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 2048

# Geometry at the reference size of 224 px; everything scales with the image size.
_REFERENCE_SIZE = 224
_SIDE_RANGE = {"small": (40, 56), "large": (80, 100)}
_GAP = 8  # least distance between two boxes
_EDGE = 4  # least distance between a box and the image border

# Nominal colours and how far each channel may stray, so the model sees shades, not four exact values.
_FILLS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (235, 200, 30)}
_FILL_JITTER = 20
# Background tones with little saturation, so no object colour is ever close to the background.
_BACKGROUNDS = {"grey": (185, 185, 185), "white": (238, 238, 238), "beige": (228, 218, 196)}
# Backgrounds vary mostly in brightness; a per-channel tint this small keeps them neutral.
_BACKGROUND_BRIGHTNESS_JITTER, _BACKGROUND_TINT_JITTER = 12, 3
_TEXTURES = ("plain", "gradient", "noise")

_OBJECT_COUNT_WEIGHTS = {1: 0.3, 2: 0.4, 3: 0.3}
# Chance that an object repeats the colour and shape of an earlier one, so counts ("two red circles")
# are common enough to learn.
_REPEAT_PROBABILITY = 0.25

_NUMBER_WORDS = {2: "two", 3: "three"}
_RELATION_WORDS = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
_LIST_PREFIXES = ("", "", "there is ", "a picture of ", "an image of ", "an image with ")


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw a scene and to caption it.

    ``fills`` are the exact RGB colours of the objects; ``texture_seed`` fixes the background
    gradient or noise, so ``render`` is a pure function of the scene.
    """

    image_size: int
    background: tuple[int, int, int]
    background_name: str
    texture: str
    texture_seed: int
    objects: tuple[SceneObject, ...]
    fills: tuple[tuple[int, int, int], ...]
    relation: Relation | None


def make_scene(rng: np.random.Generator, image_size: int = _REFERENCE_SIZE) -> Scene:
    """A random scene: 1 to 3 objects placed apart, and the relation its captions will state.

    A relation is stated between two objects that captions can single out (their colour and shape,
    or failing that their size, colour and shape, are unique in the scene) and only when their
    offset is clearly along one axis. A two-object scene whose objects can be singled out is
    re-placed until the relation is clear, so such scenes always have one.
    """
    _check_image_size(image_size)
    scale = image_size / _REFERENCE_SIZE
    gap, edge = max(2, round(_GAP * scale)), max(1, round(_EDGE * scale))
    while True:
        n = int(rng.choice(list(_OBJECT_COUNT_WEIGHTS), p=list(_OBJECT_COUNT_WEIGHTS.values())))
        kinds: list[tuple[str, str]] = []
        for _ in range(n):
            if kinds and rng.random() < _REPEAT_PROBABILITY:
                kinds.append(kinds[int(rng.integers(len(kinds)))])
            else:
                colour = COLOURS[int(rng.integers(len(COLOURS)))]
                kinds.append((colour, SHAPES[int(rng.integers(len(SHAPES)))]))
        sizes = [("small", "large")[int(rng.integers(2))] for _ in range(n)]
        sides = [round(rng.uniform(*_SIDE_RANGE[size]) * scale) for size in sizes]
        # Largest first: the big boxes are the hard ones to fit once space is taken.
        order = sorted(range(n), key=lambda i: -sides[i])
        boxes = _place(rng, [sides[i] for i in order], image_size, gap, edge)
        if boxes is None:
            continue
        placed = [(kinds[i], sizes[i], box) for i, box in zip(order, boxes, strict=True)]
        # Shuffle so that the order of objects in the data says nothing about their size.
        placed = [placed[int(i)] for i in rng.permutation(n)]
        objects = tuple(SceneObject(shape, colour, size, box) for (colour, shape), size, box in placed)
        pairs = _identifiable_pairs(objects)
        clear = [(i, j) for i, j in pairs if is_clear(objects[i], objects[j])]
        if pairs and not clear:
            continue
        relation = None
        if clear:
            i, j = clear[int(rng.integers(len(clear)))]
            if rng.random() < 0.5:
                i, j = j, i
            relation = Relation(i, relation_between(objects[i], objects[j]), j)
        fills = tuple(_jitter(rng, _FILLS[o.colour], _FILL_JITTER) for o in objects)
        background_name = tuple(_BACKGROUNDS)[int(rng.integers(len(_BACKGROUNDS)))]
        brightness = int(rng.integers(-_BACKGROUND_BRIGHTNESS_JITTER, _BACKGROUND_BRIGHTNESS_JITTER + 1))
        base = tuple(min(255, c + brightness) for c in _BACKGROUNDS[background_name])
        return Scene(
            image_size=image_size,
            background=_jitter(rng, base, _BACKGROUND_TINT_JITTER),
            background_name=background_name,
            texture=_TEXTURES[int(rng.integers(len(_TEXTURES)))],
            texture_seed=int(rng.integers(2**63)),
            objects=objects,
            fills=fills,
            relation=relation,
        )


def render(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image of ``scene.image_size`` pixels a side."""
    s = scene.image_size
    if scene.texture == "plain":
        image = Image.new("RGB", (s, s), scene.background)
    else:
        rng = np.random.default_rng(scene.texture_seed)
        pixels = np.broadcast_to(np.asarray(scene.background, dtype=np.float32), (s, s, 3))
        if scene.texture == "gradient":
            # A linear brightness ramp in a random direction, like uneven lighting.
            angle, amplitude = rng.uniform(0, 2 * math.pi), rng.uniform(8, 20)
            ramp = np.linspace(-1.0, 1.0, s, dtype=np.float32)
            shade = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
            pixels = pixels + amplitude / math.sqrt(2) * shade[:, :, None]
        else:
            # Grey (not coloured) grain, so it never looks like a hue of an object.
            pixels = pixels + rng.normal(0.0, rng.uniform(3, 7), (s, s, 1)).astype(np.float32)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj, fill in zip(scene.objects, scene.fills, strict=True):
        x, y, w, h = obj.bbox
        right, bottom = x + w - 1, y + h - 1
        if obj.shape == "circle":
            draw.ellipse((x, y, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x, y, right, bottom), fill=fill)
        else:
            draw.polygon([(x, bottom), (right, bottom), (x + (w - 1) / 2, y)], fill=fill)
    return image


def captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five captions, distinct where the wording allows, each at most 16 words.

    Every caption names every object by colour and shape, with a number where objects repeat. In a
    scene with a relation, every caption states it (either way round: "A left of B" or "B right of
    A"), so that stating where things are is what a model learns to do; otherwise the captions list
    the objects. Objects that share colour and shape with another are named with their size when
    named one by one, so each phrase is unambiguous.
    """
    relation = scene.relation
    captions: list[str] = []
    attempts = 0
    while len(captions) < CAPTIONS_PER_IMAGE:
        text = _relation_caption(scene, relation, rng) if relation is not None else _list_caption(scene, rng)
        attempts += 1
        if len(tokenize(text)) > MAX_CAPTION_WORDS:
            continue
        # Identical captions teach nothing new; past a point, accept a repeat rather than loop on.
        if text in captions and attempts < 100:
            continue
        captions.append(text)
    return captions


def assign_split(index: int, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of image ``index``: a golden-ratio (Weyl) sequence with a seed-dependent offset.

    The sequence is spread far more evenly than random draws, so each split gets its fraction of
    any prefix of the images almost exactly, and an image's split does not depend on how many images
    are generated.
    """
    offset = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]) / 2**32
    u = (offset + index * (math.sqrt(5) - 1) / 2) % 1.0
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def generate(
    out_dir: Path,
    count: int,
    seed: int,
    image_size: int = _REFERENCE_SIZE,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    jpeg_quality: int = JPEG_QUALITY,
) -> Path:
    """Write ``count`` scenes to ``out_dir/images`` and their captions to ``out_dir/dataset.json``.

    Returns the path of ``dataset.json``. Invalid arguments raise ``ValueError`` before anything is
    written. Files of the same names are overwritten; other files in ``out_dir`` are left alone, and
    ``dataset.json`` lists only the images of this run.
    """
    _check_arguments(count, seed, image_size, val_fraction, test_fraction, jpeg_quality)
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        # One independent stream per image, so image i is the same whatever the count.
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0, i]))
        scene = make_scene(rng, image_size)
        captions = captions_for(scene, rng)
        filename = f"scene_{i:06d}.jpg"
        render(scene).save(image_dir / filename, "JPEG", quality=jpeg_quality)
        sentids = [i * CAPTIONS_PER_IMAGE + k for k in range(CAPTIONS_PER_IMAGE)]
        entries.append(
            {
                "filepath": "images",
                "filename": filename,
                "imgid": i,
                "cocoid": i,
                "split": assign_split(i, seed, val_fraction, test_fraction),
                "sentids": sentids,
                "sentences": [
                    {"raw": raw, "tokens": tokenize(raw), "imgid": i, "sentid": sid}
                    for raw, sid in zip(captions, sentids, strict=True)
                ],
                "width": image_size,
                "height": image_size,
                "objects": [o.to_json() for o in scene.objects],
                "relation": None if scene.relation is None else scene.relation.to_json(),
            }
        )
    json_path = out_dir / "dataset.json"
    # Written to a side file and renamed, so a reader never sees half a dataset.
    partial = out_dir / "dataset.json.partial"
    partial.write_text(json.dumps({"dataset": "synthetic", "images": entries}) + "\n", encoding="utf-8")
    os.replace(partial, json_path)
    return json_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.synthetic",
        description="Generate the synthetic shapes data set (images and Karpathy-format dataset.json).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--count", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, required=True, help="random seed (same seed, same bytes)")
    parser.add_argument("--image-size", type=int, default=_REFERENCE_SIZE, help="side in pixels")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY)
    args = parser.parse_args(argv)
    try:
        _check_arguments(
            args.count, args.seed, args.image_size, args.val_fraction, args.test_fraction, args.jpeg_quality
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        json_path = generate(
            args.out,
            args.count,
            args.seed,
            image_size=args.image_size,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            jpeg_quality=args.jpeg_quality,
        )
    except OSError as exc:
        print(f"error: cannot write the data set: {exc}", file=sys.stderr)
        return 1
    images = json.loads(json_path.read_text(encoding="utf-8"))["images"]
    splits = Counter(entry["split"] for entry in images)
    summary = ", ".join(f"{splits[name]} {name}" for name in ("train", "val", "test"))
    print(f"wrote {json_path} ({summary})")
    return 0


def _place(
    rng: np.random.Generator, sides: list[int], image_size: int, gap: int, edge: int
) -> list[tuple[int, int, int, int]] | None:
    """Boxes of the given sides inside the image, at least ``gap`` apart; None when one will not fit."""
    boxes: list[tuple[int, int, int, int]] = []
    for side in sides:
        for _ in range(50):
            x = int(rng.integers(edge, image_size - edge - side + 1))
            y = int(rng.integers(edge, image_size - edge - side + 1))
            if all(_apart((x, y, side, side), box, gap) for box in boxes):
                boxes.append((x, y, side, side))
                break
        else:
            return None
    return boxes


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax + aw + gap <= bx or bx + bw + gap <= ax or ay + ah + gap <= by or by + bh + gap <= ay


def _identifiable_pairs(objects: Sequence[SceneObject]) -> list[tuple[int, int]]:
    """Pairs of objects that a caption can single out by colour and shape, or by size too."""
    kinds = Counter((o.colour, o.shape) for o in objects)
    sized = Counter((o.size, o.colour, o.shape) for o in objects)
    single = [
        i for i, o in enumerate(objects) if kinds[(o.colour, o.shape)] == 1 or sized[(o.size, o.colour, o.shape)] == 1
    ]
    return [(i, j) for k, i in enumerate(single) for j in single[k + 1 :]]


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], spread: int) -> tuple[int, int, int]:
    r, g, b = (int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in colour)
    return r, g, b


def _noun_phrase(objects: Sequence[SceneObject], say_size: bool, rng: np.random.Generator) -> str:
    """ "a small red circle", "one blue square", "two yellow triangles" for objects of one kind."""
    first = objects[0]
    words = ["a" if rng.random() < 0.8 else "one"] if len(objects) == 1 else [_NUMBER_WORDS[len(objects)]]
    if say_size:
        synonyms = SIZE_WORDS[first.size]
        words.append(synonyms[int(rng.integers(len(synonyms)))])
    words.append(first.colour)
    words.append(first.shape if len(objects) == 1 else first.shape + "s")
    return " ".join(words)


def _phrases(
    scene: Scene,
    indices: Sequence[int],
    sizes_wanted: bool,
    rng: np.random.Generator,
    split_kinds: Collection[tuple[str, str]] = (),
) -> list[str]:
    """Noun phrases naming the objects at ``indices``, grouped by kind (colour and shape).

    A kind whose objects all have one size is named in one phrase ("two small red circles", the size
    said when ``sizes_wanted``). A kind of mixed sizes is named either without sizes ("two red
    circles") or split by size ("a small red circle and a large red circle"); kinds in
    ``split_kinds`` (also named elsewhere in the caption) are always split, with sizes.
    """
    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for i in indices:
        o = scene.objects[i]
        groups.setdefault((o.colour, o.shape), []).append(o)
    phrases = []
    for kind, members in groups.items():
        by_size: dict[str, list[SceneObject]] = {}
        for o in members:
            by_size.setdefault(o.size, []).append(o)
        if kind in split_kinds:
            phrases.extend(_noun_phrase(group, True, rng) for group in by_size.values())
        elif len(by_size) == 1:
            phrases.append(_noun_phrase(members, sizes_wanted, rng))
        elif rng.random() < 0.5:
            phrases.append(_noun_phrase(members, False, rng))
        else:
            phrases.extend(_noun_phrase(group, True, rng) for group in by_size.values())
    return [phrases[int(i)] for i in rng.permutation(len(phrases))]


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _list_caption(scene: Scene, rng: np.random.Generator) -> str:
    phrases = _phrases(scene, range(len(scene.objects)), rng.random() < 0.4, rng)
    prefix = _LIST_PREFIXES[int(rng.integers(len(_LIST_PREFIXES)))]
    if prefix == "there is " and not phrases[0].startswith(("a ", "one ")):
        prefix = "there are "
    suffix = f" on a {scene.background_name} background" if rng.random() < 0.25 else ""
    return prefix + _join(phrases) + suffix


def _relation_caption(scene: Scene, stated: Relation, rng: np.random.Generator) -> str:
    objects = scene.objects
    subject, obj = stated.subject, stated.object
    kinds = Counter((o.colour, o.shape) for o in objects)
    sizes_wanted = rng.random() < 0.4

    def single(i: int) -> str:
        o = objects[i]
        return _noun_phrase([o], sizes_wanted or kinds[(o.colour, o.shape)] > 1, rng)

    def said(relation: str) -> str:
        words = _RELATION_WORDS[relation]
        return words[int(rng.integers(len(words)))]

    rest_indices = [i for i in range(len(objects)) if i not in (subject, obj)]
    named_kinds = {(objects[i].colour, objects[i].shape) for i in (subject, obj)}
    rest = _join(_phrases(scene, rest_indices, sizes_wanted, rng, named_kinds)) if rest_indices else ""
    and_rest = f" and {rest}" if rest else ""
    a, b = single(subject), single(obj)
    relation = stated.relation
    template = int(rng.integers(5))
    if template == 0:
        return f"{a} {said(relation)} {b}{and_rest}"
    if template == 1:
        return f"there is {a} {said(relation)} {b}{and_rest}"
    if template == 2:
        return f"{b} {said(INVERSE_RELATION[relation])} {a}{and_rest}"
    if template == 3:
        return f"{a} is {said(relation)} {b}{and_rest}"
    if rest:
        return f"{rest} and {a} {said(relation)} {b}"
    return f"a picture of {a} {said(relation)} {b}"


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {image_size!r}")


def _check_arguments(
    count: int, seed: int, image_size: int, val_fraction: float, test_fraction: float, jpeg_quality: int
) -> None:
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _check_image_size(image_size)
    # Fractions may sum to 1: an evaluation-only set (e.g. --test-fraction 1) has no training images.
    for name, fraction in (("val fraction", val_fraction), ("test fraction", test_fraction)):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {fraction!r}")
    if val_fraction + test_fraction > 1.0:
        raise ValueError("val and test fractions together must not exceed 1")
    if not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 95:
        raise ValueError(f"JPEG quality must be an integer from 1 to 95, got {jpeg_quality!r}")


if __name__ == "__main__":
    sys.exit(main())
