"""Ground truth of the synthetic scenes and the metrics that score captions against it.

BLEU and CIDEr only say whether a caption resembles the reference wording. On synthetic scenes the
truth is known exactly, so a caption can be checked for what it claims: does it name every object
(colour and shape), is the spatial relation it states true, and does the decoder look at the named
object while it writes the object's words. The word lists here are the single source of the
domain's vocabulary: the generator (``training.synthetic``) writes captions from them and the parser
below reads them back, so a caption the generator writes always parses.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")

#: The relation that holds the other way round: "A left of B" is "B right of A".
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

#: Words a caption may use for each size; the first is the canonical one.
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}

#: Determiners and number words, with the number of objects they announce.
COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "the": 1, "another": 1, "two": 2, "three": 3}

#: Token sequences that state a relation of the mention before them to the mention after them.
RELATION_PHRASES: dict[tuple[str, ...], str] = {
    ("to", "the", "left", "of"): "left of",
    ("on", "the", "left", "of"): "left of",
    ("left", "of"): "left of",
    ("to", "the", "right", "of"): "right of",
    ("on", "the", "right", "of"): "right of",
    ("right", "of"): "right of",
    ("above",): "above",
    ("over",): "above",
    ("below",): "below",
    ("under",): "below",
    ("beneath",): "below",
}

_SIZE_OF_WORD = {word: size for size, words in SIZE_WORDS.items() for word in words}
_SHAPE_OF_WORD = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}
# Longest phrases first, so "to the left of" is not read as the shorter "left of".
_PHRASES_LONGEST_FIRST = sorted(RELATION_PHRASES.items(), key=lambda item: -len(item[0]))


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene; ``bbox`` is ``(x, y, width, height)`` in pixels, y growing downwards."""

    shape: str
    colour: str
    size: str
    bbox: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2

    def contains(self, px: float, py: float) -> bool:
        """Whether a point lies inside the box, edges included."""
        x, y, w, h = self.bbox
        return x <= px <= x + w and y <= py <= y + h

    def to_json(self) -> dict:
        return {"shape": self.shape, "color": self.colour, "size": self.size, "bbox": list(self.bbox)}

    @classmethod
    def from_json(cls, data: Mapping) -> SceneObject:
        """An object from a ``dataset.json`` entry; malformed entries raise ``ValueError``."""
        try:
            shape, colour, size = data["shape"], data["color"], data["size"]
            bbox = tuple(int(v) for v in data["bbox"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a scene object (needs shape, color, size, bbox): {data!r}") from exc
        if shape not in SHAPES or colour not in COLOURS or size not in SIZES or len(bbox) != 4:
            raise ValueError(f"not a scene object of this domain: {data!r}")
        return cls(shape, colour, size, bbox)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Relation:
    """``objects[subject]`` is ``relation`` ``objects[object]`` (indices into the scene's objects)."""

    subject: int
    relation: str
    object: int

    def to_json(self) -> dict:
        return {"subject": self.subject, "relation": self.relation, "object": self.object}


def relation_between(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``, judged by box centres along the axis where they differ most.

    A tie goes to the horizontal axis. The generator only states relations whose dominant offset is
    clearly larger than the other one (see ``is_clear``), so ties never decide a stated relation.
    """
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def is_clear(a: SceneObject, b: SceneObject, ratio: float = 1.5) -> bool:
    """Whether the dominant axis between two centres leaves no doubt: ``ratio`` times the other axis.

    Two objects on a diagonal are both "left of" and "above" one another to a reader, so captions
    should not commit to either.
    """
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = abs(ax - bx), abs(ay - by)
    return max(dx, dy) >= ratio * min(dx, dy) and max(dx, dy) > 0


@dataclass(frozen=True)
class Mention:
    """A noun phrase naming objects: ``count`` of them, of ``colour`` (None when not said) and ``shape``.

    ``colour_index`` and ``shape_index`` are the positions of those words in the caption, which is
    where the decoder's attention is checked. ``start``/``end`` delimit the phrase (end exclusive).
    """

    count: int
    size: str | None
    colour: str | None
    shape: str
    colour_index: int | None
    shape_index: int
    start: int
    end: int


@dataclass(frozen=True)
class StatedRelation:
    """The caption says ``mentions[subject]`` is ``relation`` ``mentions[object]``."""

    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class ParsedCaption:
    mentions: tuple[Mention, ...]
    relations: tuple[StatedRelation, ...]


def parse_caption(words: Sequence[str]) -> ParsedCaption:
    """Find object mentions and stated relations in a tokenized caption.

    A mention is ``[count word] [size word] [colour] shape`` where the shape may be plural
    ("circles"). Its count is the number word ("two"), 1 for a determiner ("a", "the", "single"),
    else 2 for a bare plural ("red circles": at least two) and 1 for a bare singular. A relation
    phrase ("to the left of", "over", "under"...) relates the nearest mention before it to the
    nearest mention after it; a phrase without a mention on both sides states nothing.
    """
    words = _check_words(words)
    mentions: list[Mention] = []
    last_end = 0
    for k, word in enumerate(words):
        shape = _SHAPE_OF_WORD.get(word)
        if shape is None:
            continue
        j = k - 1
        colour = colour_index = size = count = None
        if j >= last_end and words[j] in COLOURS:
            colour, colour_index, j = words[j], j, j - 1
        if j >= last_end and words[j] in _SIZE_OF_WORD:
            size, j = _SIZE_OF_WORD[words[j]], j - 1
        if j >= last_end and words[j] in COUNT_WORDS:
            count, j = COUNT_WORDS[words[j]], j - 1
        if count is None:
            count = 2 if word != shape else 1
        mentions.append(Mention(count, size, colour, shape, colour_index, k, j + 1, k + 1))
        last_end = k + 1

    relations: list[StatedRelation] = []
    i = 0
    while i < len(words):
        for phrase, relation in _PHRASES_LONGEST_FIRST:
            if tuple(words[i : i + len(phrase)]) == phrase:
                before = [m for m, mention in enumerate(mentions) if mention.end <= i]
                after = [m for m, mention in enumerate(mentions) if mention.start >= i + len(phrase)]
                if before and after:
                    relations.append(StatedRelation(before[-1], relation, after[0]))
                i += len(phrase)
                break
        else:
            i += 1
    return ParsedCaption(tuple(mentions), tuple(relations))


def object_accuracy(words: Sequence[str], objects: Sequence[SceneObject | Mapping]) -> tuple[int, int]:
    """``(objects named, objects in the scene)``: an object is named when a mention gives its colour
    and shape.

    A mention names up to ``count`` objects of its colour and shape ("two red circles" names two).
    Repeating the same phrase names nothing new: per colour and shape, mentions with the same size
    word (or none) contribute their largest count, mentions with different size words add up ("a
    small red circle and a large red circle" names two). Mentions of objects the scene lacks add
    nothing, and size words are not checked here (colour and shape are what is scored).
    """
    objs = _check_objects(objects)
    counts_by_size: dict[tuple[str, str], dict[str | None, int]] = defaultdict(dict)
    for mention in parse_caption(words).mentions:
        if mention.colour is None:
            continue
        per_size = counts_by_size[(mention.colour, mention.shape)]
        per_size[mention.size] = max(per_size.get(mention.size, 0), mention.count)
    in_scene = Counter((o.colour, o.shape) for o in objs)
    named = sum(min(n, sum(counts_by_size.get(kind, {}).values())) for kind, n in in_scene.items())
    return named, len(objs)


def relation_accuracy(words: Sequence[str], objects: Sequence[SceneObject | Mapping]) -> tuple[int, int]:
    """``(correct, stated)`` over the relations the caption states.

    Each mention stands for the scene's objects with its colour (when given) and shape; a size word,
    when some of those objects have that size, narrows them to those. A relation is correct when
    both mentions stand for at least one object and it holds by box centres (``relation_between``)
    for a pair of distinct objects, quantified as the caption does: a singular mention ("a red
    circle") needs one of its objects to satisfy it, a plural one ("two red circles") all of them.
    """
    objs = _check_objects(objects)
    parsed = parse_caption(words)
    correct = 0
    for stated in parsed.relations:
        subject, obj = parsed.mentions[stated.subject], parsed.mentions[stated.object]
        if _relation_holds(stated.relation, subject, _referents(subject, objs), obj, _referents(obj, objs)):
            correct += 1
    return correct, len(parsed.relations)


def attention_grounding(
    words: Sequence[str],
    attention: np.ndarray,
    objects: Sequence[SceneObject | Mapping],
    image_size: int | tuple[int, int],
) -> tuple[int, int]:
    """``(hits, words checked)``: does the decoder look at an object while naming it?

    ``attention`` has shape ``(steps, grid_h, grid_w)`` with one map per generated word
    (``steps >= len(words)``; extra rows, e.g. for ``<end>``, are ignored) and is taken to cover the
    whole image, which the encoder resizes without cropping. ``image_size`` is the side of the square
    image or ``(width, height)``.

    Rule: for every mention that gives a colour and a shape of which the scene has at least one
    object, its colour word and its shape word are checked. The peak of a word's map is its argmax
    cell (the first on ties); the peak's position in the image is that cell's centre, i.e.
    ``((col + 0.5) * width / grid_w, (row + 0.5) * height / grid_h)``. This is also where the peak of
    the map upsampled bilinearly lies, since bilinear interpolation takes its maximum at a grid node.
    The word is a hit when that point lies inside (edges included) the box of any scene object with
    the mention's colour and shape. Mentions of objects the scene lacks are not checked.
    """
    words = _check_words(words)
    objs = _check_objects(objects)
    attention = np.asarray(attention)
    if attention.ndim != 3 or attention.shape[0] < len(words) or min(attention.shape[1:], default=0) < 1:
        raise ValueError(f"attention must have shape (steps >= {len(words)}, grid_h, grid_w), got {attention.shape}")
    if not np.all(np.isfinite(attention)):
        raise ValueError("attention contains NaN or infinite values")
    width, height = _image_dimensions(image_size)
    grid_h, grid_w = attention.shape[1:]
    hits = checked = 0
    for mention in parse_caption(words).mentions:
        if mention.colour is None:
            continue
        named = [o for o in objs if o.colour == mention.colour and o.shape == mention.shape]
        if not named:
            continue
        for index in (mention.colour_index, mention.shape_index):
            row, col = np.unravel_index(int(np.argmax(attention[index])), (grid_h, grid_w))
            px, py = (col + 0.5) * width / grid_w, (row + 0.5) * height / grid_h
            hits += any(o.contains(px, py) for o in named)
            checked += 1
    return hits, checked


def score_scenes(records: Iterable[tuple[Sequence[str], np.ndarray | None, Mapping]]) -> dict:
    """Dataset-level scores from ``(words, attention or None, dataset.json image entry)`` records.

    Ratios are pooled over all records (hits summed, then divided), so scenes with more objects
    weigh more. A ratio is ``None`` when nothing was there to score: no objects, no stated relations,
    or no attention given. The raw counts are returned beside the ratios.
    """
    named = total = correct = stated = hits = checked = n = 0
    for words, attention, entry in records:
        objects = [SceneObject.from_json(o) for o in _entry_field(entry, "objects")]
        a, b = object_accuracy(words, objects)
        named, total = named + a, total + b
        a, b = relation_accuracy(words, objects)
        correct, stated = correct + a, stated + b
        if attention is not None:
            size = (int(_entry_field(entry, "width")), int(_entry_field(entry, "height")))
            a, b = attention_grounding(words, attention, objects, size)
            hits, checked = hits + a, checked + b
        n += 1
    return {
        "object_accuracy": named / total if total else None,
        "relation_accuracy": correct / stated if stated else None,
        "attention_grounding": hits / checked if checked else None,
        "captions": n,
        "objects_named": named,
        "objects_total": total,
        "relations_correct": correct,
        "relations_stated": stated,
        "attention_hits": hits,
        "attention_checked": checked,
    }


def _referents(mention: Mention, objects: Sequence[SceneObject]) -> list[SceneObject]:
    matching = [o for o in objects if o.shape == mention.shape and mention.colour in (None, o.colour)]
    sized = [o for o in matching if o.size == mention.size]
    return sized or matching


def _relation_holds(
    relation: str,
    subject: Mention,
    subjects: list[SceneObject],
    obj: Mention,
    objects: list[SceneObject],
) -> bool:
    if not subjects or not objects:
        return False

    def against(a: SceneObject) -> bool:
        others = [b for b in objects if b is not a]
        if not others:
            return False
        truths = (relation_between(a, b) == relation for b in others)
        return all(truths) if obj.count > 1 else any(truths)

    verdicts = (against(a) for a in subjects)
    return all(verdicts) if subject.count > 1 else any(verdicts)


def _check_words(words: Sequence[str]) -> list[str]:
    if isinstance(words, str) or not all(isinstance(w, str) for w in words):
        raise ValueError("words must be a list of tokens (str), e.g. captioner.vocab.tokenize(caption)")
    return list(words)


def _check_objects(objects: Sequence[SceneObject | Mapping]) -> list[SceneObject]:
    return [o if isinstance(o, SceneObject) else SceneObject.from_json(o) for o in objects]


def _image_dimensions(image_size: int | tuple[int, int]) -> tuple[int, int]:
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {image_size!r}")
    return width, height


def _entry_field(entry: Mapping, key: str):
    try:
        return entry[key]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"dataset entry lacks {key!r}; expected an image entry of dataset.json") from exc
