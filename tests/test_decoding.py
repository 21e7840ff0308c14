"""Greedy, batched beam search and sampling over one decoder step function."""

from __future__ import annotations

import pytest
import torch

from captioner import decoding
from captioner.config import DecoderConfig
from captioner.decoder import Decoder
from captioner.decoding import SearchOptions, beam_search, search
from captioner.errors import OptionError
from captioner.vocab import END_ID, PAD_ID, START_ID, UNK_ID


def make_decoder(seed: int = 0, dtype: torch.dtype = torch.float32, end_bias: float = 0.0) -> Decoder:
    torch.manual_seed(seed)
    config = DecoderConfig(vocab_size=40, feature_dim=12, embed_dim=8, attention_dim=10, hidden_dim=16, dropout=0.0)
    decoder = Decoder(config).eval().to(dtype)
    with torch.no_grad():
        decoder.output.bias[END_ID] += end_bias  # makes captions end sooner (>0) or never (<<0)
    return decoder


def features(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 9, 12, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("beam_size", [1, 2, 4])
@pytest.mark.parametrize(
    "repeats", [{}, {"no_repeat_ngram_size": 2, "repetition_penalty": 1.3}], ids=["plain", "no-repeat"]
)
def test_batched_search_equals_one_image_at_a_time(
    dtype: torch.dtype, tolerance: float, beam_size: int, repeats: dict
) -> None:
    # Scores can differ in the last bits only: BLAS sums in a batch-size dependent order.
    decoder = make_decoder(dtype=dtype, end_bias=1.0)
    images = features(7, dtype=dtype)
    options = SearchOptions(beam_size=beam_size, max_length=12, n_best=beam_size, **repeats)
    with torch.no_grad():
        batched = search(decoder, images, options)
        single = [search(decoder, images[i : i + 1], options)[0] for i in range(7)]
    lengths = {len(h.tokens) for hyps in batched for h in hyps}
    assert len(lengths) > 1, "the images should finish at different steps, exercising batch shrinking"
    for together, alone in zip(batched, single, strict=True):
        assert [h.tokens for h in together] == [h.tokens for h in alone]
        for a, b in zip(together, alone, strict=True):
            assert abs(a.score - b.score) <= tolerance
            assert abs(a.log_prob - b.log_prob) <= tolerance
            torch.testing.assert_close(a.attention, b.attention, rtol=0, atol=tolerance)


@pytest.mark.parametrize(
    "options",
    [
        SearchOptions(beam_size=1, max_length=10),
        SearchOptions(beam_size=3, n_best=3, max_length=10),
        SearchOptions(sample=True, n_best=3, max_length=10, temperature=0.8),
    ],
    ids=["greedy", "beam", "sampling"],
)
def test_search_finds_the_same_captions_with_either_memory(options: SearchOptions, monkeypatch) -> None:
    """Whether a search reads the context through the projected memory is a matter of speed only."""
    decoder = make_decoder(dtype=torch.float64, end_bias=1.0)
    images = features(5, dtype=torch.float64)
    found = {}
    for projected, weight_read_rows in ((True, 10**9), (False, -(10**9))):
        monkeypatch.setattr(decoding, "WEIGHT_READ_ROWS", weight_read_rows)
        with torch.no_grad():
            found[projected] = search(decoder, images, options, torch.Generator().manual_seed(0))
    for hyps, plain_hyps in zip(found[True], found[False], strict=True):
        assert [h.tokens for h in hyps] == [h.tokens for h in plain_hyps]
        for a, b in zip(hyps, plain_hyps, strict=True):
            assert abs(a.log_prob - b.log_prob) <= 1e-12
            torch.testing.assert_close(a.attention, b.attention, rtol=0, atol=1e-12)


def test_projecting_the_memory_is_chosen_where_it_pays() -> None:
    assert decoding._worth_projecting(images=1, rows=1, regions=49), "a single image's steps are bound by the weights"
    assert decoding._worth_projecting(images=32, rows=96, regions=49), "a beam of 3 over 32 images"
    assert not decoding._worth_projecting(images=64, rows=64, regions=49), "greedy search over many images"
    assert not decoding._worth_projecting(images=8, rows=8, regions=196), "a 14x14 grid costs 4x to project"


def test_beam_size_one_equals_greedy_and_beam_search_finds_no_worse() -> None:
    decoder = make_decoder(end_bias=1.5)
    images = features(6)
    with torch.no_grad():
        greedy = search(decoder, images, SearchOptions(beam_size=1, max_length=10, length_penalty=0.0))
        beam1 = search(decoder, images, SearchOptions(beam_size=1, max_length=10, length_penalty=0.0))
        beam5 = search(decoder, images, SearchOptions(beam_size=5, max_length=10, length_penalty=0.0))
        # A manual argmax decode through the public step function, as the reference.
        memory, state = decoder.init_state(images[:1])
        token, manual = torch.tensor([START_ID]), []
        for _ in range(11):
            step = decoder.step(token, state, memory)
            state = step.state
            logits = decoder.step_logits(step)
            logits[:, [PAD_ID, START_ID, UNK_ID]] = float("-inf")
            token = logits.argmax(dim=1)
            manual.append(int(token))
            if int(token) == END_ID:
                break
    assert greedy[0][0].tokens == manual
    assert [h[0].tokens for h in greedy] == [h[0].tokens for h in beam1]
    for g, b in zip(greedy, beam5, strict=True):
        assert b[0].log_prob >= g[0].log_prob - 1e-5, "a wider beam must not find a less probable caption"


def repeated_ngrams(tokens: list[int], n: int) -> int:
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(ngrams) - len(set(ngrams))


def manual_greedy(decoder: Decoder, image: torch.Tensor, max_length: int, penalty: float, ban_ngram: int) -> list[int]:
    """Argmax decoding through the public step function, with the CTRL penalty and the n-gram ban
    written out word by word: the reference for the search's vectorised version."""
    memory, state = decoder.init_state(image.unsqueeze(0))
    token, said = torch.tensor([START_ID]), []
    for _ in range(max_length):
        step = decoder.step(token, state, memory)
        state = step.state
        logits = decoder.step_logits(step)[0]  # (V,)
        for word in set(said):
            logits[word] = logits[word] / penalty if logits[word] > 0 else logits[word] * penalty
        if ban_ngram and len(said) >= ban_ngram:
            prefix = said[len(said) - ban_ngram + 1 :]
            for i in range(len(said) - ban_ngram + 1):
                if said[i : i + ban_ngram - 1] == prefix:
                    logits[said[i + ban_ngram - 1]] = float("-inf")
        logits[[PAD_ID, START_ID, UNK_ID]] = float("-inf")
        said.append(int(logits.argmax()))
        token = torch.tensor([said[-1]])
        if said[-1] == END_ID:
            return said
    return [*said, END_ID]  # ended by max_length


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size_leaves_no_ngram_twice_in_every_mode(n: int) -> None:
    decoder = make_decoder(end_bias=-1e4)  # never ends: captions run to max_length and repeat themselves
    images = features(6)
    modes = [
        SearchOptions(beam_size=1, max_length=50),
        SearchOptions(beam_size=3, n_best=3, max_length=50),
        SearchOptions(sample=True, n_best=3, max_length=50, temperature=0.3),
    ]
    for options in modes:
        with torch.no_grad():
            plain = search(decoder, images, options, torch.Generator().manual_seed(0))
            banned = search(decoder, images, SearchOptions(**{**options.__dict__, "no_repeat_ngram_size": n}),
                            torch.Generator().manual_seed(0))  # fmt: skip
        assert sum(repeated_ngrams(h.tokens[:-1], n) for hyps in plain for h in hyps) > 0, "the test needs repeats"
        for hyps in banned:
            assert len(hyps) == options.n_best
            for h in hyps:
                assert repeated_ngrams(h.tokens[:-1], n) == 0, h.tokens


@pytest.mark.parametrize("penalty, ban_ngram", [(1.0, 2), (1.5, 0), (1.3, 3)])
def test_repetition_controls_match_a_word_by_word_reference(penalty: float, ban_ngram: int) -> None:
    decoder = make_decoder(dtype=torch.float64, end_bias=-2.0)
    images = features(4, dtype=torch.float64)
    options = SearchOptions(beam_size=1, max_length=15, no_repeat_ngram_size=ban_ngram, repetition_penalty=penalty)
    with torch.no_grad():
        greedy = search(decoder, images, options)
        beam1 = beam_search(decoder, images, options)
        expected = [manual_greedy(decoder, image, 15, penalty, ban_ngram) for image in images]
        unchanged = search(decoder, images, SearchOptions(beam_size=1, max_length=15))
    assert [h[0].tokens for h in greedy] == expected
    assert [h[0].tokens for h in beam1] == expected, "a beam of one is greedy search, with the controls too"
    assert [h[0].tokens for h in unchanged] != expected, "the controls should change some caption here"


@pytest.mark.parametrize(
    "options",
    [SearchOptions(beam_size=1), SearchOptions(beam_size=3, n_best=3), SearchOptions(sample=True, n_best=3)],
    ids=["greedy", "beam", "sampling"],
)
def test_the_unknown_word_is_never_said(options: SearchOptions) -> None:
    decoder = make_decoder(end_bias=1.0)
    with torch.no_grad():
        decoder.output.bias[UNK_ID] += 8.0  # the likeliest word everywhere, were it allowed
        results = search(decoder, features(4), options, torch.Generator().manual_seed(0))
        logits = decoder.step_logits(
            decoder.step(torch.full((4,), START_ID), *reversed(decoder.init_state(features(4))))
        )
    assert bool((logits.argmax(dim=1) == UNK_ID).all()), "the test needs <unk> to be the model's first choice"
    for hyps in results:
        for h in hyps:
            assert UNK_ID not in h.tokens and len(h.tokens) >= 1


def test_n_best_is_sorted_distinct_and_scored_by_length_penalty() -> None:
    decoder = make_decoder(end_bias=2.0)
    with torch.no_grad():
        results = search(decoder, features(3), SearchOptions(beam_size=4, n_best=4, max_length=10, length_penalty=0.7))
    for hyps in results:
        assert len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 4
        for h in hyps:
            assert h.tokens[-1] == END_ID
            assert h.score == pytest.approx(h.log_prob / len(h.tokens) ** 0.7)
            assert h.attention.shape == (len(h.tokens), 9)
            torch.testing.assert_close(h.attention.sum(dim=1), torch.ones(len(h.tokens)))


@pytest.mark.parametrize(
    "options", [SearchOptions(beam_size=1), SearchOptions(beam_size=3, n_best=3), SearchOptions(sample=True)]
)
def test_a_result_even_when_no_end_token_is_ever_chosen(options: SearchOptions) -> None:
    decoder = make_decoder(end_bias=-1e4)
    options = SearchOptions(**{**options.__dict__, "max_length": 7})
    with torch.no_grad():
        results = search(decoder, features(2), options, torch.Generator().manual_seed(0))
    for hyps in results:
        assert len(hyps) == options.n_best
        for h in hyps:
            assert h.truncated
            assert len(h.tokens) == 8 and h.tokens[-1] == END_ID and END_ID not in h.tokens[:-1]
            assert PAD_ID not in h.tokens and START_ID not in h.tokens


def test_sampling_gives_variety_and_is_reproducible_with_a_seed() -> None:
    decoder = make_decoder(end_bias=1.0)
    images = features(1).expand(12, 9, 12)
    options = SearchOptions(sample=True, temperature=1.5, max_length=10)
    with torch.no_grad():
        first = search(decoder, images, options, torch.Generator().manual_seed(3))
        again = search(decoder, images, options, torch.Generator().manual_seed(3))
        greedy = search(decoder, images, SearchOptions(beam_size=1, max_length=10))
        top1 = search(decoder, images, SearchOptions(sample=True, top_k=1, max_length=10), torch.Generator())
    assert [h[0].tokens for h in first] == [h[0].tokens for h in again]
    assert len({tuple(h[0].tokens) for h in first}) > 3, "sampling should vary where argmax cannot"
    assert len({tuple(h[0].tokens) for h in greedy}) == 1
    assert [h[0].tokens for h in top1] == [h[0].tokens for h in greedy], "top-k 1 sampling is greedy"


def test_sampling_n_best_returns_that_many_sorted_samples() -> None:
    decoder = make_decoder(end_bias=1.0)
    with torch.no_grad():
        results = search(decoder, features(2), SearchOptions(sample=True, n_best=5), torch.Generator().manual_seed(0))
    assert [len(h) for h in results] == [5, 5]
    for hyps in results:
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"beam_size": 0}, "beam_size"),
        ({"max_length": 0}, "max_length"),
        ({"beam_size": 2, "n_best": 3}, "n_best"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"no_repeat_ngram_size": 2.5}, "no_repeat_ngram_size"),
        ({"no_repeat_ngram_size": 11}, "no_repeat_ngram_size"),
        ({"repetition_penalty": 0.9}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"repetition_penalty": "2"}, "repetition_penalty"),
        ({"beam_size": 2.5}, "beam_size"),
        ({"max_length": 7.5}, "max_length"),
        ({"top_k": 2.5}, "top_k"),
        ({"n_best": True}, "n_best"),
        ({"length_penalty": float("inf")}, "length_penalty"),
        ({"sample": "yes"}, "sample"),
    ],
)
def test_bad_options_raise_option_error(kwargs: dict, word: str) -> None:
    with pytest.raises(OptionError, match=word):
        SearchOptions(**kwargs)


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 1e-3])
def test_a_tiny_temperature_samples_the_likeliest_word_instead_of_failing(temperature: float) -> None:
    decoder = make_decoder(end_bias=1.0)
    options = SearchOptions(sample=True, temperature=temperature, max_length=10)
    with torch.no_grad():
        sampled = search(decoder, features(6), options, torch.Generator().manual_seed(0))
        greedy = search(decoder, features(6), SearchOptions(beam_size=1, max_length=10))
    assert [h[0].tokens for h in sampled] == [h[0].tokens for h in greedy]


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"n_best": 1.5, "sample": True}, "n_best"),
        ({"beam_size": 3.0}, "beam_size"),
        ({"top_k": True}, "top_k"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"distinct": 1}, "distinct"),
    ],
)
def test_options_of_the_wrong_type_raise_option_error(kwargs: dict, word: str) -> None:
    with pytest.raises(OptionError, match=word):
        SearchOptions(**kwargs)


def test_a_seed_gives_each_image_its_own_samples_whatever_the_batch() -> None:
    decoder = make_decoder(end_bias=1.0)
    images = features(6)
    options = SearchOptions(sample=True, temperature=1.5, max_length=10, n_best=2)
    with torch.no_grad():
        whole = search(decoder, images, options, decoding.sampling_generators(7, range(6)))
        alone = [search(decoder, images[i : i + 1], options, decoding.sampling_generators(7, [i]))[0] for i in range(6)]
        middle = search(decoder, images[2:5], options, decoding.sampling_generators(7, range(2, 5)))
        other_seed = search(decoder, images, options, decoding.sampling_generators(8, range(6)))
    tokens = [[h.tokens for h in hyps] for hyps in whole]
    assert tokens == [[h.tokens for h in hyps] for hyps in alone]
    assert tokens[2:5] == [[h.tokens for h in hyps] for hyps in middle]
    assert tokens != [[h.tokens for h in hyps] for hyps in other_seed]


def test_one_image_at_several_positions_gets_different_samples() -> None:
    decoder = make_decoder(end_bias=1.0)
    options = SearchOptions(sample=True, temperature=1.5, max_length=10)
    with torch.no_grad():
        found = search(decoder, features(1).expand(8, 9, 12), options, decoding.sampling_generators(3, range(8)))
    assert len({tuple(h[0].tokens) for h in found}) > 3, "each position draws from its own stream"


def test_top_k_draws_from_exactly_k_words_when_words_tie() -> None:
    decoder = make_decoder()
    with torch.no_grad():
        decoder.output.weight.zero_()
        decoder.output.bias.zero_()  # every word equally likely: all of them tie with the k-th
        found = search(
            decoder, features(64), SearchOptions(sample=True, top_k=3, max_length=1), torch.Generator().manual_seed(0)
        )
    first_words = {hyps[0].tokens[0] for hyps in found}
    allowed = [word for word in range(40) if word not in decoding.NEVER_SAID]
    assert first_words == set(allowed[:3]), "ties are broken by the word's index: the k lowest"


def test_sampled_n_best_are_distinct_captions_unless_repeats_are_allowed() -> None:
    decoder = make_decoder(end_bias=3.0)  # short, predictable captions: repeats are likely
    images = features(4)
    with torch.no_grad():
        distinct = search(
            decoder, images, SearchOptions(sample=True, n_best=6), decoding.sampling_generators(0, range(4))
        )
        repeats = search(
            decoder,
            images,
            SearchOptions(sample=True, n_best=6, distinct=False),
            decoding.sampling_generators(0, range(4)),
        )
    for hyps in distinct:
        assert len(hyps) == 6 and len({tuple(h.tokens) for h in hyps}) == 6
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert any(len({tuple(h.tokens) for h in hyps}) < 6 for hyps in repeats), "the test needs repeats to be likely"


def test_distinct_samples_stop_short_when_the_model_offers_fewer_captions() -> None:
    decoder = make_decoder(end_bias=1.0)
    options = SearchOptions(sample=True, top_k=1, n_best=3, max_length=10)  # top-1 sampling: one caption only
    with torch.no_grad():
        found = search(decoder, features(2), options, decoding.sampling_generators(0, range(2)))
        greedy = search(decoder, features(2), SearchOptions(beam_size=1, max_length=10))
    assert [[h.tokens for h in hyps] for hyps in found] == [[h[0].tokens] for h in greedy]


def test_image_seeds_differ_for_nearby_seeds_and_positions() -> None:
    seeds = {decoding.image_seed(seed, index) for seed in range(-3, 30) for index in range(30)}
    assert len(seeds) == 33 * 30 and all(0 <= s < 2**64 for s in seeds)
