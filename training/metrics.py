"""The standard caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D.

Scores are only comparable with published numbers when they are computed exactly the way the COCO
caption evaluation computes them, so every rule here follows that evaluation's definitions, including
its quirks (smoothing constants in BLEU, precision and recall maximised separately in ROUGE-L,
document frequencies taken from the evaluated references in CIDEr-D). METEOR is not reimplemented:
its synonym and paraphrase matching is only defined by the METEOR 1.5 jar, which is run as a
subprocess.

All functions take captions that are already tokenized (``captioner.vocab.tokenize``):
``candidates`` maps an image id to one caption (a list of words) and ``references`` maps the same
ids to one or more reference captions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from captioner.errors import CaptionerError

ImageId = Hashable
Candidates = Mapping[ImageId, Sequence[str]]
References = Mapping[ImageId, Sequence[Sequence[str]]]

MAX_ORDER = 4
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0
METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

# BLEU's smoothing in the COCO evaluation: ``tiny`` keeps a zero match count from becoming a log(0)
# and ``small`` keeps an empty candidate from dividing by zero. They make a perfect match score a
# hair below 1, which published numbers include.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9

# The METEOR jar's own data (paraphrase table, stemmer) is found relative to the jar, which the
# ``pycocoevalcap`` package ships in its ``meteor`` folder.
_METEOR_JAR_NAME = "meteor-1.5.jar"
# The paraphrase table needs more than the JVM's default heap on small machines.
_METEOR_HEAP = "-Xmx2G"
_METEOR_FIELD_SEPARATOR = "|||"


class MetricError(CaptionerError, ValueError):
    """Input the metrics cannot score (mismatched ids, empty references...) or METEOR cannot run."""

    code = "invalid_metric_input"


def _check_caption(caption: object, what: str) -> None:
    """Reject anything but a list of non-empty, whitespace-free words.

    A plain string is a sequence of strings too, so it would silently be scored character by
    character; words with whitespace would be split differently by each metric (and would break
    METEOR's line protocol).
    """
    if isinstance(caption, str) or not isinstance(caption, Sequence):
        raise MetricError(f"{what} must be a list of words, got {type(caption).__name__}")
    for word in caption:
        if not isinstance(word, str) or not word or word.split() != [word]:
            raise MetricError(f"{what} contains {word!r}, which is not a single non-empty word")


def _validate(candidates: Candidates, references: References) -> list[ImageId]:
    """The image ids to score, after checking that both sides describe the same images."""
    if not isinstance(candidates, Mapping) or not isinstance(references, Mapping):
        raise MetricError("candidates and references must both map image ids to captions")
    if not candidates:
        raise MetricError("there are no candidate captions to score")
    missing = [i for i in candidates if i not in references]
    if missing:
        raise MetricError(f"no references for image id(s) {_list_ids(missing)}")
    extra = [i for i in references if i not in candidates]
    if extra:
        raise MetricError(f"no candidate caption for image id(s) {_list_ids(extra)}")
    for image_id, caption in candidates.items():
        _check_caption(caption, f"the candidate of image {image_id!r}")
    for image_id, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise MetricError(f"the references of image {image_id!r} must be a list of captions")
        if not refs:
            raise MetricError(f"image {image_id!r} has an empty list of references")
        for k, ref in enumerate(refs):
            _check_caption(ref, f"reference {k} of image {image_id!r}")
            if not ref:
                raise MetricError(f"reference {k} of image {image_id!r} has no words")
    return list(candidates)


def _list_ids(ids: Sequence[ImageId], shown: int = 5) -> str:
    text = ", ".join(repr(i) for i in ids[:shown])
    return text if len(ids) <= shown else f"{text} (and {len(ids) - shown} more)"


def _ngram_counts(words: Sequence[str], max_order: int = MAX_ORDER) -> Counter[tuple[str, ...]]:
    """How often each n-gram of order 1..max_order occurs; the orders share one counter."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_order + 1):
        for start in range(len(words) - n + 1):
            counts[tuple(words[start : start + n])] += 1
    return counts


def bleu(candidates: Candidates, references: References, max_order: int = MAX_ORDER) -> list[float]:
    """Corpus-level BLEU-1..BLEU-``max_order`` (Papineni et al., 2002) as COCO computes it.

    Clipped n-gram matches and n-gram counts are summed over all images before the precisions are
    formed, and the brevity penalty compares the total candidate length with the total of, per image,
    the reference length closest to the candidate's (the shorter one on a tie).
    """
    image_ids = _validate(candidates, references)
    matches = [0] * max_order
    totals = [0] * max_order
    candidate_length = 0
    reference_length = 0
    for image_id in image_ids:
        words = candidates[image_id]
        refs = references[image_id]
        # Clipping: an n-gram is credited at most as often as it occurs in any single reference.
        max_ref_counts: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            max_ref_counts |= _ngram_counts(ref, max_order)
        for ngram, count in _ngram_counts(words, max_order).items():
            matches[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for n in range(1, max_order + 1):
            totals[n - 1] += max(0, len(words) - n + 1)
        candidate_length += len(words)
        reference_length += _closest_length(len(words), refs)

    scores = []
    product = 1.0
    for n in range(max_order):
        # The running product makes BLEU-n the geometric mean of the precisions of orders 1..n.
        product *= (matches[n] + _BLEU_TINY) / (totals[n] + _BLEU_SMALL)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (candidate_length + _BLEU_TINY) / (reference_length + _BLEU_SMALL)
    if ratio < 1.0:
        penalty = math.exp(1.0 - 1.0 / ratio)
        scores = [score * penalty for score in scores]
    return scores


def _closest_length(length: int, refs: Sequence[Sequence[str]]) -> int:
    """The reference length nearest ``length``; ties go to the shorter reference, as in COCO."""
    return min((abs(len(ref) - length), len(ref)) for ref in refs)[1]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, keeping one row of the dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for word in a:
        diagonal = 0
        for j, other in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if word == other else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l_per_image(candidates: Candidates, references: References, beta: float = ROUGE_BETA) -> dict[ImageId, float]:
    """ROUGE-L (Lin, 2004) of each image's candidate against its references.

    As in COCO, the best precision and the best recall over the references are taken separately
    (they may come from different references) and then combined into an F-measure weighted by
    ``beta``; an empty candidate scores 0.
    """
    scores = {}
    for image_id in _validate(candidates, references):
        words = candidates[image_id]
        best_precision = best_recall = 0.0
        for ref in references[image_id]:
            common = _lcs_length(words, ref)
            if words:
                best_precision = max(best_precision, common / len(words))
            best_recall = max(best_recall, common / len(ref))
        if best_precision > 0 and best_recall > 0:
            scores[image_id] = (1 + beta**2) * best_precision * best_recall / (best_recall + beta**2 * best_precision)
        else:
            scores[image_id] = 0.0
    return scores


def rouge_l(candidates: Candidates, references: References, beta: float = ROUGE_BETA) -> float:
    """ROUGE-L averaged over images (see :func:`rouge_l_per_image`)."""
    scores = rouge_l_per_image(candidates, references, beta)
    return sum(scores.values()) / len(scores)


_Vectors = tuple[list[dict[tuple[str, ...], float]], list[float], int]  # per-order TF-IDF, norms, words


class CiderD:
    """CIDEr-D (Vedantam et al., 2015) as COCO computes its "CIDEr", with the document frequencies of a
    fixed corpus: the references of the evaluated images for the metric, the training references for
    a reward (self-critical training), where scores must not depend on which images share a batch.

    For each n-gram order 1..4, the cosine similarity of TF-IDF vectors, where the candidate's
    weights are clipped to the reference's and the similarity is damped by a Gaussian of the length
    difference (``sigma`` words); averaged over orders and references and multiplied by 10.
    """

    def __init__(self, corpus: Sequence[Sequence[Sequence[str]]], sigma: float = CIDER_SIGMA) -> None:
        """``corpus``: the reference captions of each image (lists of words); an n-gram's document
        frequency is the number of images with a reference that contains it."""
        self.sigma = sigma
        self.document_frequency: Counter[tuple[str, ...]] = Counter()
        for refs in corpus:
            self.document_frequency.update({ngram for ref in refs for ngram in _ngram_counts(ref)})
        self.log_documents = math.log(len(corpus))

    def vectors(self, words: Sequence[str]) -> _Vectors:
        """TF-IDF weights per n-gram order, each order's norm and the length in words.

        Term frequencies are raw counts, as in COCO: the cosine similarity makes the scale irrelevant,
        but the clipping compares raw weighted counts. An n-gram absent from every reference of the
        corpus gets a document frequency of 1, i.e. the largest weight.
        """
        vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(MAX_ORDER)]
        for ngram, count in _ngram_counts(words).items():
            idf = self.log_documents - math.log(max(1.0, self.document_frequency[ngram]))
            vectors[len(ngram) - 1][ngram] = count * idf
        norms = [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]
        return vectors, norms, len(words)

    def score(self, words: Sequence[str], references: Sequence[_Vectors]) -> float:
        """The CIDEr-D of ``words`` against references prepared by ``vectors`` (prepare them once)."""
        cand_vectors, cand_norms, length = self.vectors(words)
        total = 0.0
        for ref_vectors, ref_norms, ref_length in references:
            # COCO measures the length difference in bigrams; it equals the difference in words
            # whenever the similarity is non-zero, since both captions then have words.
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
            for n in range(MAX_ORDER):
                ref_vector = ref_vectors[n]
                dot = sum(
                    min(weight, ref_vector.get(ngram, 0.0)) * ref_vector.get(ngram, 0.0)
                    for ngram, weight in cand_vectors[n].items()
                )
                if cand_norms[n] != 0 and ref_norms[n] != 0:
                    dot /= cand_norms[n] * ref_norms[n]
                total += dot * penalty
        return 10.0 * total / MAX_ORDER / len(references)


def cider_d_per_image(
    candidates: Candidates, references: References, sigma: float = CIDER_SIGMA
) -> dict[ImageId, float]:
    """CIDEr-D of each image (see :class:`CiderD`). Document frequencies come from the references of
    the evaluated images, so a score depends on the whole set."""
    image_ids = _validate(candidates, references)
    scorer = CiderD([references[image_id] for image_id in image_ids], sigma)
    return {
        image_id: scorer.score(candidates[image_id], [scorer.vectors(ref) for ref in references[image_id]])
        for image_id in image_ids
    }


def cider_d(candidates: Candidates, references: References, sigma: float = CIDER_SIGMA) -> float:
    """CIDEr-D averaged over images (see :func:`cider_d_per_image`)."""
    scores = cider_d_per_image(candidates, references, sigma)
    return sum(scores.values()) / len(scores)


# Articles, prepositions, conjunctions and possessives: a caption whose last word is one of these was
# cut off mid-phrase ("a man in a"), which n-gram metrics barely notice.
DANGLING_WORDS = frozenset({
    "a", "an", "the", "and", "or", "but", "of", "in", "on", "at", "to", "with", "from", "by", "for",
    "into", "onto", "over", "under", "near", "behind", "while", "his", "her", "its", "their",
})  # fmt: skip


def dangling_fraction(captions: Sequence[Sequence[str]]) -> float:
    """The share of ``captions`` (lists of words) that end on a word of ``DANGLING_WORDS``."""
    if not captions:
        return 0.0
    return sum(bool(words) and words[-1] in DANGLING_WORDS for words in captions) / len(captions)


def find_meteor_jar() -> Path:
    """The METEOR 1.5 jar shipped inside the installed ``pycocoevalcap`` package."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise MetricError("METEOR needs the pycocoevalcap package, which ships its jar: pip install pycocoevalcap")
    for location in spec.submodule_search_locations:
        jar = Path(location) / "meteor" / _METEOR_JAR_NAME
        if jar.is_file():
            return jar
    raise MetricError(f"the installed pycocoevalcap package has no meteor/{_METEOR_JAR_NAME}")


class MeteorScorer:
    """A running METEOR 1.5 process (Denkowski and Lavie, 2014) in its English, normalising mode.

    The jar's ``-stdio`` protocol is line based: ``SCORE ||| ref ||| ... ||| candidate`` answers
    with a line of sufficient statistics, and ``EVAL ||| stats ||| ...`` answers with one score per
    statistics line and then the corpus score, which METEOR aggregates from the statistics (it is
    not the mean of the per-image scores). Starting the JVM and loading the paraphrase table takes
    seconds, so one process is meant to score many captions. Use it as a context manager, or call
    :meth:`close`. Not safe to share between threads.
    """

    def __init__(self, jar: Path | None = None, java: str = "java") -> None:
        jar = find_meteor_jar() if jar is None else Path(jar)
        if not jar.is_file():
            raise MetricError(f"the METEOR jar {jar} does not exist")
        java_path = shutil.which(java)
        if java_path is None:
            raise MetricError(f"METEOR needs Java, but {java!r} was not found on PATH (or skip METEOR)")
        # stderr goes to a file: a pipe nobody reads could fill up and stall the JVM mid-protocol.
        # The file lives as long as the process, so close() releases it rather than a with-block.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        command = [java_path, "-jar", _METEOR_HEAP, str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
        try:
            self._process = subprocess.Popen(
                command,
                # The jar finds its data folder (paraphrase table) beside itself, not in the working
                # directory; running it from there anyway matches the COCO wrapper.
                cwd=jar.parent,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                encoding="utf-8",
                bufsize=1,
            )
        except OSError as error:
            self._stderr.close()
            raise MetricError(f"could not start METEOR ({java_path}): {error}") from error

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Let the JVM exit (killing it if it does not within a few seconds); safe to call twice."""
        # Closing stdin is METEOR's signal to finish; it fails if the JVM already died.
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process.stdout.close()
        self._stderr.close()

    def _ask(self, line: str) -> str:
        """Send one protocol line and return the answer line, turning a dead JVM into MetricError."""
        try:
            self._process.stdin.write(line + "\n")
            self._process.stdin.flush()
        except OSError as error:
            raise MetricError(f"METEOR stopped accepting input: {self._error_output()}") from error
        return self._read()

    def _read(self) -> str:
        answer = self._process.stdout.readline()
        if not answer:
            raise MetricError(f"METEOR exited unexpectedly: {self._error_output()}")
        return answer.strip()

    def _error_output(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode("utf-8", "replace").strip()
        return text[-2000:] or "(no error output)"

    @staticmethod
    def _line(words: Sequence[str]) -> str:
        # "|||" separates the protocol's fields, so it cannot appear inside a caption.
        return " ".join(w for w in (word.replace(_METEOR_FIELD_SEPARATOR, "") for word in words) if w)

    def score(self, candidates: Candidates, references: References) -> float:
        """The corpus METEOR score of the candidates against their references."""
        image_ids = _validate(candidates, references)
        statistics = []
        for image_id in image_ids:
            fields = [
                "SCORE",
                *(self._line(ref) for ref in references[image_id]),
                self._line(candidates[image_id]),
            ]
            statistics.append(self._ask(" ||| ".join(fields)))
        self._ask(" ||| ".join(["EVAL", *statistics]))
        # The first answer line was the first image's score; skip the rest, then read the total.
        for _ in range(len(image_ids) - 1):
            self._read()
        total = self._read()
        try:
            return float(total)
        except ValueError as error:
            raise MetricError(f"METEOR answered {total!r} instead of a score") from error


def compute_metrics(candidates: Candidates, references: References, meteor: bool = True) -> dict[str, float]:
    """All COCO caption metrics under the COCO evaluation's keys and in its order.

    ``meteor=False`` leaves out the ``METEOR`` key, which avoids needing Java.
    """
    results = {f"Bleu_{n + 1}": score for n, score in enumerate(bleu(candidates, references))}
    if meteor:
        with MeteorScorer() as scorer:
            results["METEOR"] = scorer.score(candidates, references)
    results["ROUGE_L"] = rouge_l(candidates, references)
    results["CIDEr"] = cider_d(candidates, references)
    return results
