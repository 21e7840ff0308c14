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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from captioner.decoder import Decoder, Memory, State
from captioner.errors import OptionError
from captioner.vocab import END_ID, PAD_ID, START_ID, UNK_ID

NEVER_SAID = [PAD_ID, START_ID, UNK_ID]


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
        if not isinstance(self.sample, bool):
            raise OptionError(f"sample must be true or false, not {self.sample!r}")
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
    generator: torch.Generator | None = None,
) -> list[list[Hypothesis]]:
    """Dispatch on the options: sampling, greedy (beam size 1) or beam search; ``features`` (B, R, C)."""
    if options.sample:
        pick = _sampler(options.temperature, options.top_k, generator)
        found = _search_one_path(decoder, features, options, pick, copies=options.n_best)
        per_image = [found[i : i + options.n_best] for i in range(0, len(found), options.n_best)]
        return [sorted((h for [h] in group), key=lambda h: -h.score) for group in per_image]
    if options.beam_size == 1:
        return _search_one_path(decoder, features, options, _argmax)
    return beam_search(decoder, features, options)


def _argmax(log_probs: torch.Tensor) -> torch.Tensor:
    return log_probs.argmax(dim=1)


def _sampler(
    temperature: float, top_k: int, generator: torch.Generator | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    def pick(log_probs: torch.Tensor) -> torch.Tensor:
        scaled = log_probs / temperature  # (N, V)
        if top_k > 0 and top_k < scaled.shape[1]:
            threshold = scaled.topk(top_k, dim=1).values[:, -1:]  # (N, 1)
            scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
        return torch.multinomial(scaled.softmax(dim=1), 1, generator=generator).squeeze(1)  # (N,)

    return pick


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
    pick: Callable[[torch.Tensor], torch.Tensor],
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
        tokens = pick(log_probs)  # (N,)
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
