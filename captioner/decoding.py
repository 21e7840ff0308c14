"""Caption search: greedy, batched beam search and sampling, all driven by ``Decoder.step``.

Every mode works on a whole batch of images at once, drops images from the batch as soon as their
search is over, and returns, per image, hypotheses best first with their per-word attention.

Lengths: ``max_length`` bounds the number of words. A hypothesis that reaches it without choosing
``<end>`` is ended there with the model's own probability of ``<end>`` at that point and marked
``truncated``, so every image gets a result. The score of a hypothesis is its total log-probability
divided by ``length ** length_penalty`` (length counts the words plus ``<end>``): 0 ranks by raw
log-probability, which favours short captions; 1 ranks by mean log-probability per token.

No mode ever says ``<unk>``: it stands for the rare words training merged into one, and no reader
can use it, so the search takes the likeliest real word there instead.

Repetition: every mode reads the next word from the same distribution, after two optional changes
that depend only on a row's own words so far. ``no_repeat_ngram_size = n`` forbids any word that
would make an n-gram the caption already holds ("a hat and a hat" with n = 2), and
``repetition_penalty = p`` makes each word already in the caption less likely, dividing its logit
by p where it is positive and multiplying it by p where negative (Keskar et al.'s CTRL rule). Scores
and log-probabilities are then those of the changed distribution, the one the search ranks by.

Sampling draws each word from the distribution raised to the power ``1 / temperature`` (computed
in float64 after subtracting the row's maximum, so any temperature above 0 works; a tiny one picks
the likeliest word, as greedy search does, or one of the words tied with it). ``top_k = k`` draws
among exactly k words, ties at the k-th broken towards the lower word id. With ``n_best > 1`` the
samples are distinct captions (``distinct``, the default): a repeat is drawn again, in up to
``DISTINCT_SAMPLE_ROUNDS`` rounds of ``n_best`` draws per image, after which an image whose model
offers fewer captions keeps fewer.

Randomness: ``search`` takes either one generator, which all rows share (the draws of an image then
depend on the others in its batch), or one generator per image. ``sampling_generators(seed,
indices)`` makes the latter from a seed and each image's index in the caller's input; an image's
draws come only from its own generator, in an order fixed by its own search, so the same seed, the
same image at the same index, the same options and the same model on the same device sample the
same captions whatever batch the image is grouped into. (Batches of different sizes may round the
model's arithmetic differently in the last bits; a draw could change only where that moves a
probability across the random number drawn, which the tests have not seen happen.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from captioner.decoder import Decoder, Memory, State
from captioner.errors import OptionError
from captioner.vocab import END_ID, PAD_ID, START_ID, UNK_ID

NEVER_SAID = [PAD_ID, START_ID, UNK_ID]
DISTINCT_SAMPLE_ROUNDS = 5  # rounds of n_best draws per image before distinct sampling settles for fewer
_UINT64 = (1 << 64) - 1

# One generator shared by every row, or one per image of the batch (see ``sampling_generators``).
Generators = torch.Generator | Sequence[torch.Generator] | None
# A row picker: (log-probabilities (N, V), the row of the search each of them is (N,)) -> words (N,).
Pick = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]  # generated ids, the final <end> included
    log_prob: float  # sum of the log-probabilities of ``tokens``
    score: float  # log_prob / len(tokens) ** length_penalty
    attention: torch.Tensor  # (len(tokens), R) attention weights that produced each token
    truncated: bool  # ended by max_length rather than by the model


@dataclass(frozen=True)
class SearchOptions:
    beam_size: int = 3
    max_length: int = 20
    n_best: int = 1
    length_penalty: float = 1.0
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    distinct: bool = True  # sampling with n_best > 1: no caption twice among an image's samples

    def __post_init__(self) -> None:
        # Types first: a float beam or a string penalty would otherwise pass the range checks or fail
        # deep inside torch with an error that names neither the option nor the rule.
        for name in ("beam_size", "max_length", "n_best", "top_k", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise OptionError(f"{name} must be an integer, not {value!r}")
        for name in ("length_penalty", "temperature", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise OptionError(f"{name} must be a finite number, not {value!r}")
        for name in ("sample", "distinct"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise OptionError(f"{name} must be true or false, not {value!r}")
        if not 1 <= self.beam_size <= 50:
            raise OptionError("beam_size must be an integer from 1 to 50", code="invalid_option")
        if not 1 <= self.max_length <= 200:
            raise OptionError("max_length must be an integer from 1 to 200")
        if not 1 <= self.n_best <= (self.beam_size if not self.sample else 50):
            raise OptionError("n_best must be at least 1 and at most beam_size (or 50 when sampling)")
        if not self.length_penalty >= 0.0:
            raise OptionError("length_penalty must be >= 0")
        if not 0.0 < self.temperature <= 100.0:
            raise OptionError("temperature must lie in (0, 100]")
        if self.top_k < 0:
            raise OptionError("top_k must be >= 0 (0 disables it)")
        if not 0 <= self.no_repeat_ngram_size <= 10:
            raise OptionError("no_repeat_ngram_size must be an integer from 0 to 10 (0 disables it)")
        if not 1.0 <= self.repetition_penalty <= 10.0:
            raise OptionError("repetition_penalty must lie in [1, 10] (1 disables it)")


def search(
    decoder: Decoder,
    features: torch.Tensor,
    options: SearchOptions,
    generator: Generators = None,
) -> list[list[Hypothesis]]:
    """Dispatch on the options: sampling, greedy (beam size 1) or beam search; ``features`` (B, R, C).
    ``generator`` (sampling only): one shared by all rows, or one per image (``sampling_generators``)."""
    if options.sample:
        return _sample(decoder, features, options, generator)
    if options.beam_size == 1:
        return _search_one_path(decoder, features, options, _argmax)
    return beam_search(decoder, features, options)


def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of the image at ``index`` of a call seeded ``seed``: SplitMix64 of the pair,
    so that nearby seeds and indices start unrelated random streams."""

    def mix(value: int) -> int:
        value = (value + 0x9E3779B97F4A7C15) & _UINT64
        value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
        value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _UINT64
        return value ^ (value >> 31)

    return mix((mix(seed & _UINT64) + index) & _UINT64)


def sampling_generators(seed: int, indices: Iterable[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, for the images at ``indices`` of the caller's input, seeded from
    ``seed`` and the index: an image samples alike whichever batch it is searched in."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(f"seed must be an integer, not {seed!r}")
    return [torch.Generator(device=device).manual_seed(image_seed(seed, index)) for index in indices]


def _argmax(log_probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return log_probs.argmax(dim=1)


def _sample(
    decoder: Decoder, features: torch.Tensor, options: SearchOptions, generator: Generators
) -> list[list[Hypothesis]]:
    """``n_best`` samples per image, best first; distinct ones (``options.distinct``) by drawing again
    for the images still short of them, each from its own generator where there is one per image."""
    n_images, copies = features.shape[0], options.n_best
    per_image = generator is not None and not isinstance(generator, torch.Generator)
    if per_image and len(generator) != n_images:
        raise ValueError(f"{len(generator)} generators for {n_images} images: give one per image")
    kept: list[list[Hypothesis]] = [[] for _ in range(n_images)]
    said: list[set[tuple[int, ...]]] = [set() for _ in range(n_images)]
    short = list(range(n_images))  # images with fewer than n_best samples
    rounds = DISTINCT_SAMPLE_ROUNDS if options.distinct and copies > 1 else 1
    for _ in range(rounds):
        generators = [generator[i] for i in short] if per_image else generator
        subset = features if len(short) == n_images else features[torch.tensor(short, device=features.device)]
        pick = _sampler(options.temperature, options.top_k, generators, copies)
        found = _search_one_path(decoder, subset, options, pick, copies=copies)
        for position, image in enumerate(short):
            for [hypothesis] in found[position * copies : (position + 1) * copies]:
                words = tuple(hypothesis.tokens)
                if len(kept[image]) < copies and not (options.distinct and words in said[image]):
                    kept[image].append(hypothesis)
                    said[image].add(words)
        short = [image for image in short if len(kept[image]) < copies]
        if not short:
            break
    return [sorted(hypotheses, key=lambda h: -h.score) for hypotheses in kept]


def _sampler(temperature: float, top_k: int, generator: Generators, rows_per_image: int) -> Pick:
    """Draws a word per row; with one generator per image, each image's rows draw from their own."""

    def pick(log_probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        probs = _sampling_log_weights(log_probs, temperature, top_k).softmax(dim=1)  # (N, V) float64
        if generator is None or isinstance(generator, torch.Generator):
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (N,)
        # Rows are image-major and stay in order as they end, so each image's rows are consecutive.
        images, counts = torch.unique_consecutive(rows // rows_per_image, return_counts=True)
        draws = [
            torch.multinomial(part, 1, generator=generator[image])
            for image, part in zip(images.tolist(), probs.split(counts.tolist()), strict=True)
        ]
        return torch.cat(draws).squeeze(1)  # (N,)

    return pick


def _sampling_log_weights(log_probs: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Log-weights (N, V) of ``log_probs`` sharpened or flattened by ``temperature``, outside the
    ``top_k`` words -inf. In float64 after subtracting the row's maximum, and divided rather than
    multiplied by 1/T (which overflows): the likeliest word stays at 0 for any T > 0, so softmax
    never sees a row without a finite entry."""
    log_probs = log_probs.double()
    if 0 < top_k < log_probs.shape[1]:
        log_probs = _keep_top_k(log_probs, top_k)
    best = log_probs.max(dim=1, keepdim=True).values  # (N, 1) finite: <end> is always possible
    return (log_probs - best) / temperature


def _keep_top_k(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """``log_probs`` (N, V) with all but exactly ``k`` words per row at -inf: the words above the
    k-th value, then the lowest ids among those equal to it (``topk`` alone leaves the choice among
    ties unspecified; a threshold alone keeps every tied word)."""
    threshold = log_probs.topk(k, dim=1).values[:, -1:]  # (N, 1)
    above = log_probs > threshold
    tied = log_probs == threshold
    room = k - above.sum(dim=1, keepdim=True)  # (N, 1) tied words that still fit
    keep = above | (tied & (tied.cumsum(dim=1) <= room))
    return log_probs.masked_fill(~keep, float("-inf"))


def _discourage_repeats(logits: torch.Tensor, generated: torch.Tensor, options: SearchOptions) -> None:
    """Apply the repetition penalty and the n-gram ban, in place, to ``logits`` (N, V) of rows whose
    words so far are ``generated`` (N, t)."""
    t = generated.shape[1]
    if options.repetition_penalty != 1.0 and t > 0:
        seen = logits.gather(1, generated)  # (N, t) logits of the words already said
        p = options.repetition_penalty
        logits.scatter_(1, generated, torch.where(seen > 0, seen / p, seen * p))
    n = options.no_repeat_ngram_size
    if n == 0 or t == 0:
        return
    if n == 1:
        logits.scatter_(1, generated, float("-inf"))  # no word twice
        return
    if t < n:
        return  # no whole n-gram yet
    ngrams = generated.unfold(1, n, 1)  # (N, W, n) every n-gram said so far, W = t - n + 1
    prefix = generated[:, t - n + 1 :]  # (N, n-1) the words a new n-gram would start with
    repeats = (ngrams[:, :, :-1] == prefix.unsqueeze(1)).all(dim=2)  # (N, W) n-grams that began so before
    rows, at = repeats.nonzero(as_tuple=True)
    logits[rows, ngrams[rows, at, -1]] = float("-inf")  # the word that would repeat such an n-gram


def _next_log_probs(
    decoder: Decoder,
    tokens: torch.Tensor,
    state: State,
    memory: Memory,
    force_end: bool,
    generated: torch.Tensor,
    options: SearchOptions,
) -> tuple[torch.Tensor, State, torch.Tensor]:
    """Read ``tokens`` (N,), the last of each row's words so far ``generated`` (N, t); the next word's
    log-probabilities (N, V), the new state and the attention that produced them (N, R)."""
    step = decoder.step(tokens, state, memory)
    logits = decoder.step_logits(step)  # (N, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # half precision is too coarse for summing log-probabilities
    _discourage_repeats(logits, generated, options)
    # <pad> and <start> are never words of a caption; <unk> stands for the rare words training merged
    # into it, and no reader can use it, so the search says the likeliest real word instead.
    logits[:, NEVER_SAID] = float("-inf")
    log_probs = logits.log_softmax(dim=1)  # (N, V)
    if force_end:
        keep = torch.full_like(log_probs, float("-inf"))
        keep[:, END_ID] = log_probs[:, END_ID]
        log_probs = keep  # (N, V) only <end> remains possible
    return log_probs, step.state, step.alpha


# The projected memory (``Memory``) costs R products with the context's weights per image, once; the
# plain one costs one per row and per step, and a step of a small batch is bound by reading those
# weights, which takes about as long as WEIGHT_READ_ROWS rows' products (EfficientNet-Lite0's 1280
# channels on a 2-core CPU: projecting pays for greedy search up to about 16 images, and for a beam
# of 3 up to about 50). Captions take about EXPECTED_STEPS steps.
WEIGHT_READ_ROWS = 40
EXPECTED_STEPS = 12


def _worth_projecting(images: int, rows: int, regions: int) -> bool:
    return images * regions <= EXPECTED_STEPS * (rows + WEIGHT_READ_ROWS)


def _search_one_path(
    decoder: Decoder,
    features: torch.Tensor,
    options: SearchOptions,
    pick: Pick,
    copies: int = 1,
) -> list[list[Hypothesis]]:
    """One hypothesis per row, extended by ``pick`` (argmax for greedy, a draw for sampling); each
    image gets ``copies`` rows in a row (independent draws), its memory computed once for them all."""
    n = features.shape[0] * copies
    projected = _worth_projecting(features.shape[0], n, features.shape[1])
    memory, state = decoder.init_state(features, rows_per_image=copies, projected=projected)
    memory = memory.one_row_per_image()  # rows end one by one, each taking its memory along
    active = torch.arange(n, device=features.device)  # rows still being extended
    tokens = torch.full((n,), START_ID, dtype=torch.long, device=features.device)
    generated = torch.empty(n, 0, dtype=torch.long, device=features.device)  # (N, t) words so far
    history: list[list[tuple[int, float, torch.Tensor]]] = [[] for _ in range(n)]
    results: list[list[Hypothesis]] = [[] for _ in range(n)]
    for t in range(options.max_length + 1):
        log_probs, state, alpha = _next_log_probs(
            decoder, tokens, state, memory, t == options.max_length, generated, options
        )
        tokens = pick(log_probs, active)  # (N,)
        generated = torch.cat([generated, tokens.unsqueeze(1)], dim=1)  # (N, t+1)
        chosen = log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (N,)
        ended = tokens == END_ID  # (N,)
        for image, token, lp, a in zip(active.tolist(), tokens.tolist(), chosen.tolist(), alpha, strict=True):
            history[image].append((token, lp, a))
            if token == END_ID:
                results[image] = [_hypothesis(history[image], options.length_penalty, t == options.max_length)]
        if bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)  # (N',)
            active, tokens, generated = active[keep], tokens[keep], generated[keep]
            memory, state = memory.select(keep), state.select(keep)
    return results


def _hypothesis(steps: list[tuple[int, float, torch.Tensor]], length_penalty: float, truncated: bool) -> Hypothesis:
    log_prob = sum(lp for _, lp, _ in steps)
    return Hypothesis(
        tokens=[token for token, _, _ in steps],
        log_prob=log_prob,
        score=log_prob / len(steps) ** length_penalty,
        attention=torch.stack([a for _, _, a in steps]).cpu(),
        truncated=truncated,
    )


def beam_search(decoder: Decoder, features: torch.Tensor, options: SearchOptions) -> list[list[Hypothesis]]:
    """Beam search over a whole batch: every image keeps ``K`` live beams in one (B*K) decoder batch.

    An image's search ends once ``K`` hypotheses have chosen ``<end>``; its rows then leave the batch.
    Each step ranks the 2K best extensions of an image's beams: ``<end>`` extensions among the first
    K become finished hypotheses, and the K best others continue (there are always at least K, since
    at most one extension per beam is ``<end>``).
    """
    K, device = options.beam_size, features.device
    n_images = features.shape[0]
    projected = _worth_projecting(n_images, n_images * K, features.shape[1])
    memory, state = decoder.init_state(features, rows_per_image=K, projected=projected)  # rows image-major
    images = torch.arange(n_images, device=device)  # images still searching, in batch order
    tokens = torch.full((n_images * K,), START_ID, dtype=torch.long, device=device)
    beam_log_prob = torch.zeros(n_images, K, device=device, dtype=torch.float64)  # (B, K)
    beam_log_prob[:, 1:] = float("-inf")  # all beams start identical: only the first one may extend
    token_history = torch.empty(n_images * K, 0, dtype=torch.long, device=device)  # (B*K, t)
    attention_history: torch.Tensor | None = None  # (B*K, t, R)
    finished: list[list[Hypothesis]] = [[] for _ in range(n_images)]
    for t in range(options.max_length + 1):
        log_probs, state, alpha = _next_log_probs(
            decoder, tokens, state, memory, t == options.max_length, token_history, options
        )
        B, V = images.shape[0], log_probs.shape[1]
        candidates = (beam_log_prob.unsqueeze(2) + log_probs.view(B, K, V)).view(B, K * V)  # (B, K*V)
        top_log_prob, top_index = candidates.topk(2 * K, dim=1)  # (B, 2K)
        source_beam, word = top_index // V, top_index % V  # (B, 2K)
        source_row = source_beam + torch.arange(B, device=device).unsqueeze(1) * K  # (B, 2K) rows of the batch
        attention_so_far = (
            alpha.unsqueeze(1)
            if attention_history is None
            else torch.cat([attention_history, alpha.unsqueeze(1)], dim=1)
        )  # (B*K, t+1, R)
        is_end = (word == END_ID) & (top_log_prob > float("-inf"))  # (B, 2K)
        for b, k in (is_end[:, :K]).nonzero().tolist():
            image, row = int(images[b]), int(source_row[b, k])
            if len(finished[image]) < K:
                finished[image].append(
                    Hypothesis(
                        tokens=[*token_history[row].tolist(), END_ID],
                        log_prob=float(top_log_prob[b, k]),
                        score=float(top_log_prob[b, k]) / (t + 1) ** options.length_penalty,
                        attention=attention_so_far[row].cpu(),
                        truncated=t == options.max_length,
                    )
                )
        # The K best extensions that are not <end> continue; a stable sort keeps them in score order.
        order = torch.sort(is_end.to(torch.int8), dim=1, stable=True).indices[:, :K]  # (B, K)
        rows = source_row.gather(1, order).flatten()  # (B*K,)
        beam_log_prob = top_log_prob.gather(1, order)  # (B, K)
        tokens = word.gather(1, order).flatten()  # (B*K,)
        token_history = torch.cat([token_history[rows], tokens.unsqueeze(1)], dim=1)  # (B*K, t+1)
        attention_history = attention_so_far[rows]  # (B*K, t+1, R)
        # An image's beams only ever come from its own K rows, which share its memory: the memory
        # needs no reordering (only the state does), which spares a copy of it every step.
        state = state.select(rows)
        searching = torch.tensor([len(finished[int(i)]) < K for i in images], dtype=torch.bool, device=device)  # (B,)
        if not bool(searching.any()):
            break
        if not bool(searching.all()):
            keep_images = searching.nonzero().squeeze(1)  # (B',)
            keep_rows = (keep_images.unsqueeze(1) * K + torch.arange(K, device=device)).flatten()  # (B'*K,)
            images, beam_log_prob = images[keep_images], beam_log_prob[keep_images]
            tokens, token_history = tokens[keep_rows], token_history[keep_rows]
            attention_history = attention_history[keep_rows]
            state, memory = state.select(keep_rows), memory.select(keep_images)
    return [sorted(hyps, key=lambda h: -h.score)[: options.n_best] for hyps in finished]
