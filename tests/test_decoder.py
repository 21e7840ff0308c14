"""The decoder: one step function for training and inference, attention math, the loss."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from captioner.config import DecoderConfig
from captioner.decoder import Decoder, Memory, caption_loss, caption_slots
from captioner.decoding import SearchOptions, search

VARIANTS = [
    {},
    {"cell": "gru"},
    {"cell": "rnn"},
    {"num_layers": 2},
    {"deep_output": False},
    {"gate": False},
    {"attention": "mean"},
    {"positions": True},
    {"positions": True, "key_channels": 5},
    {"positions": True, "key_channels": 5, "word_query": True},
]


def make_decoder(seed: int = 0, **overrides: object) -> Decoder:
    torch.manual_seed(seed)
    config = DecoderConfig(
        vocab_size=30, feature_dim=12, embed_dim=8, attention_dim=10, hidden_dim=14, dropout=0.3, **overrides
    )
    return Decoder(config).eval()


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_teacher_forced_logits_equal_step_by_step_decoding(overrides: dict) -> None:
    decoder = make_decoder(**overrides)
    features = torch.randn(3, 9, 12)
    captions = torch.randint(4, 30, (3, 7))
    captions[:, 0] = 1
    with torch.no_grad():
        logits, alphas = decoder(features, captions)
        memory, state = decoder.init_state(features)
        for t in range(captions.shape[1] - 1):
            step = decoder.step(captions[:, t], state, memory)
            state = step.state
            torch.testing.assert_close(decoder.step_logits(step), logits[:, t], rtol=0, atol=1e-6)
            torch.testing.assert_close(step.alpha, alphas[:, t], rtol=0, atol=1e-7)
    assert logits.shape == (3, 6, 30) and alphas.shape == (3, 6, 9)


def test_attention_weights_are_distributions_that_depend_on_the_state() -> None:
    decoder = make_decoder()
    features = torch.randn(2, 9, 12)
    captions = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    targets = (captions[:, 1:] != 0).double()  # (2, 4): the second caption has ended at its last step
    with torch.no_grad():
        _, alphas = decoder(features, captions)
    torch.testing.assert_close(alphas.sum(dim=2).double(), targets)  # none past a caption's end
    assert (alphas >= 0).all()
    assert not torch.allclose(alphas[:, 0], alphas[:, 1]), "soft attention should move between steps"
    mean_decoder = make_decoder(attention="mean")
    with torch.no_grad():
        _, uniform = mean_decoder(features, captions)
    torch.testing.assert_close(uniform.double(), targets.unsqueeze(2).expand(-1, -1, 9) / 9)


def test_attention_weights_are_the_papers_softmax_of_tanh_scores() -> None:
    """The scores are computed through sigmoid; the weights must be softmax_i(w^T tanh(W_a a_i + W_h h + b) + b_w)."""
    decoder = make_decoder().double()
    features = torch.randn(3, 9, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.nn.init.normal_(decoder.attention_score.bias, std=3.0)  # a bias shift must not matter either
        memory, state = decoder.init_state(features)
        h = torch.randn_like(state.h[-1]) * 2  # (B, H), away from the initial state
        x = decoder.attention_features(features) + decoder.attention_hidden(h).unsqueeze(1)  # (B, R, A)
        expected = decoder.attention_score(torch.tanh(x)).squeeze(2).softmax(dim=1)  # (B, R)
        torch.testing.assert_close(decoder.attention_weights(memory, h), expected, rtol=0, atol=1e-12)
        rows = torch.tensor([0, 0, 1, 1, 2, 2])  # two rows per image, sharing its memory
        shared = decoder.attention_weights(replace(memory, rows_per_image=2), h[rows])
        torch.testing.assert_close(shared, expected[rows], rtol=0, atol=1e-12)


def test_word_query_makes_attention_depend_on_the_previous_word() -> None:
    """With word_query, rows with the same state but different previous words look at different
    places, by softmax_i(w^T tanh(W_a a_i + W_h h + W_e E y + b) + b_w); without it they cannot."""
    features = torch.randn(1, 9, 12, dtype=torch.float64).expand(2, 9, 12)
    tokens = torch.tensor([5, 6])
    for word_query in (False, True):
        decoder = make_decoder(word_query=word_query).double()
        with torch.no_grad():
            memory, state = decoder.init_state(features)
            alpha = decoder.step(tokens, state, memory).alpha  # (2, R): same image and state, two words
            if not word_query:
                torch.testing.assert_close(alpha[0], alpha[1], rtol=0, atol=0)
                continue
            embedded = decoder.embedding(tokens)  # (2, E)
            query = decoder.attention_hidden(state.h[-1]) + decoder.attention_word(embedded)  # (2, A)
            x = decoder.attention_features(features) + query.unsqueeze(1)  # (2, R, A)
            expected = decoder.attention_score(torch.tanh(x)).squeeze(2).softmax(dim=1)  # (2, R)
            torch.testing.assert_close(alpha, expected, rtol=0, atol=1e-12)
            assert not torch.allclose(alpha[0], alpha[1]), "the previous word should move attention"
            with pytest.raises(ValueError, match="pass embedded"):
                decoder.attention_weights(memory, state.h[-1])


def test_positions_let_attention_tell_identical_regions_apart() -> None:
    same_everywhere = torch.randn(1, 1, 12).expand(2, 9, 12)
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2]])
    with torch.no_grad():
        _, plain = make_decoder()(same_everywhere, captions)
        _, placed = make_decoder(positions=True)(same_everywhere, captions)
    torch.testing.assert_close(plain, torch.full_like(plain, 1 / 9))  # no position: nothing to tell apart
    assert (placed.amax(dim=2) > 1 / 9 + 1e-3).all(), "with positions the regions differ"
    with pytest.raises(ValueError, match="square grid"):
        make_decoder(positions=True)(torch.randn(1, 8, 12), captions[:1])


def test_positions_enter_attention_and_context_as_if_added_to_every_feature() -> None:
    """The decoder keeps a_i and P p_i apart; the result must be that of the values a_i + P p_i."""
    decoder = make_decoder(positions=True).double()
    features = torch.randn(3, 9, 12, dtype=torch.float64)
    memory, state = decoder.init_state(features)
    values = features + memory.positions  # (B, R, C)
    gate = torch.sigmoid(decoder.gate(state.h[-1]))
    for training_memory in (True, False):
        memory, state = decoder.init_state(features, projected=not training_memory)
        step = decoder.step(torch.tensor([1, 5, 6]), state, memory)
        expected_context = gate * torch.einsum("br,brc->bc", step.alpha, values)  # (B, C) z_t
        torch.testing.assert_close(decoder.readout(step), decoder.output_context(expected_context), rtol=0, atol=1e-12)
        torch.testing.assert_close(memory.keys, 2 * decoder.attention_features(values), rtol=0, atol=1e-12)
    training, _ = decoder.init_state(features)
    torch.testing.assert_close(training.mean, values.mean(dim=1), rtol=0, atol=1e-12)


def test_key_channels_decide_where_to_look_and_the_context_reads_every_channel() -> None:
    decoder = make_decoder(positions=True, key_channels=5).double()
    features = torch.randn(3, 9, 12, dtype=torch.float64)
    other_wide = features.clone()
    other_wide[..., :7] = torch.randn(3, 9, 7, dtype=torch.float64)  # only the channels keys do not read
    h = torch.randn(3, 14, dtype=torch.float64)
    with torch.no_grad():
        memory, _ = decoder.init_state(features)
        other_memory, _ = decoder.init_state(other_wide)
        values = features + memory.positions  # (B, R, C)
        torch.testing.assert_close(memory.keys, 2 * decoder.attention_features(values[..., 7:]), rtol=0, atol=1e-12)
        alpha = decoder.attention_weights(memory, h)  # (B, R)
        torch.testing.assert_close(decoder.attention_weights(other_memory, h), alpha, rtol=0, atol=1e-12)
        _, state = decoder.init_state(features)
        step, other_step = (decoder.step(torch.tensor([1, 5, 6]), state, m) for m in (memory, other_memory))
    assert not torch.allclose(decoder.readout(step), decoder.readout(other_step)), "the context reads all channels"


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_decoding_memory_takes_the_same_steps_as_training_memory(overrides: dict) -> None:
    """Decoding reads the context through its projections, once per image and shared by an image's
    rows; every step must still be the one teacher forcing takes."""
    decoder = make_decoder(**overrides).double()
    features = torch.randn(2, 9, 12, dtype=torch.float64)
    rows = torch.tensor([0, 0, 0, 1, 1, 1])  # three rows per image, as beams
    training_memory, training_state = decoder.init_state(features)
    training_memory, training_state = training_memory.select(rows), training_state.select(rows)
    memory, state = decoder.init_state(features, rows_per_image=3, projected=True)
    assert memory.projected is not None and memory.keys.shape[0] == 2, "each image is held once"
    tokens = torch.randint(4, 30, (4, 6))
    for t in range(tokens.shape[0]):
        expected = decoder.step(tokens[t], training_state, training_memory)
        step = decoder.step(tokens[t], state, memory)
        torch.testing.assert_close(step.alpha, expected.alpha, rtol=0, atol=1e-12)
        torch.testing.assert_close(step.state.h, expected.state.h, rtol=0, atol=1e-12)
        torch.testing.assert_close(decoder.step_logits(step), decoder.step_logits(expected), rtol=0, atol=1e-12)
        state, training_state = step.state, expected.state


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_recurrence_is_that_of_torch_cells(cell: str) -> None:
    """The decoder does its cells' math itself (its first layer's input arrives in two parts); it
    must be exactly what nn.LSTMCell, nn.GRUCell and nn.RNNCell (tanh) compute with the same weights."""
    decoder = make_decoder(cell=cell, num_layers=2, gate=False).double()
    features = torch.randn(3, 9, 12, dtype=torch.float64)
    memory, state = decoder.init_state(features)
    embedded = torch.randn(3, 8, dtype=torch.float64)
    step = decoder.advance(embedded, state, memory)
    context = torch.einsum("br,brc->bc", step.alpha, features)
    layer_input, expected = torch.cat([embedded, context], dim=1), []
    for i, torch_cell in enumerate(decoder.cells):
        if cell == "lstm":
            h, c = torch_cell(layer_input, (state.h[i], state.c[i]))
            torch.testing.assert_close(step.state.c[i], c, rtol=0, atol=1e-12)
        else:
            h = torch_cell(layer_input, state.h[i])
        expected.append(h)
        layer_input = h
    torch.testing.assert_close(step.state.h, torch.stack(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("overrides", [{}, {"positions": True}, {"cell": "gru", "num_layers": 2}])
def test_captions_grouped_by_image_train_as_if_each_had_its_own_copy(overrides: dict) -> None:
    decoder = make_decoder(**overrides).double()
    images = torch.randn(2, 9, 12, dtype=torch.float64)
    image_of_caption = torch.tensor([0, 0, 1, 0, 1])
    captions = torch.randint(4, 30, (5, 6))
    captions[:, 0] = 1
    grouped, grouped_alphas = decoder(images, captions, image_of_caption)
    grouped.sum().backward()
    grouped_gradients = [p.grad.clone() for p in decoder.parameters()]
    decoder.zero_grad()
    copied, copied_alphas = decoder(images[image_of_caption], captions)
    copied.sum().backward()
    torch.testing.assert_close(grouped, copied, rtol=0, atol=1e-12)
    torch.testing.assert_close(grouped_alphas, copied_alphas, rtol=0, atol=1e-12)
    for mine, theirs in zip(grouped_gradients, (p.grad for p in decoder.parameters()), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("overrides", [{}, {"positions": True, "key_channels": 5, "word_query": True}])
def test_captions_of_different_lengths_train_as_if_each_ran_alone_to_its_end(overrides: dict) -> None:
    decoder = make_decoder(**overrides).double()
    images = torch.randn(3, 9, 12, dtype=torch.float64)
    image_of_caption = torch.tensor([0, 1, 0, 2, 1, 0])
    lengths = [3, 7, 2, 5, 6, 3]  # tokens, <start> and <end> included; image 0's steps end first
    captions = torch.zeros(6, 7, dtype=torch.long)
    for row, length in enumerate(lengths):
        captions[row, :length] = torch.randint(4, 30, (length,))
        captions[row, 0], captions[row, length - 1] = 1, 2
    logits, alphas = decoder(images, captions, image_of_caption)
    targets = captions[:, 1:] != 0
    (logits.logsumexp(dim=2) * targets).sum().backward()
    batched = [p.grad.clone() for p in decoder.parameters()]
    decoder.zero_grad()
    for row, length in enumerate(lengths):  # each caption alone, cut at its end: no padding at all
        alone, alone_alphas = decoder(images[image_of_caption[row]][None], captions[row : row + 1, :length])
        torch.testing.assert_close(logits[row, : length - 1], alone[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(alphas[row, : length - 1], alone_alphas[0], rtol=0, atol=1e-12)
        alone.logsumexp(dim=2).sum().backward()
    assert (alphas[~targets] == 0).all(), "no attention past a caption's end"
    for mine, theirs in zip(batched, (p.grad for p in decoder.parameters()), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)


def test_grouped_captions_get_consecutive_rows_of_their_image_in_their_order() -> None:
    image_of_caption = torch.tensor([2, 0, 0, 2, 1, 0])
    slots, rows_per_image = caption_slots(image_of_caption, images=4)  # image 3 has no caption
    assert rows_per_image == 3  # image 0's three captions
    assert slots.tolist() == [6, 0, 1, 7, 3, 2]  # image i owns rows 3i..3i+2, filled in caption order
    one_each, rows = caption_slots(torch.tensor([1, 0, 2]), images=3)
    assert rows == 1 and one_each.tolist() == [1, 0, 2]


def test_teacher_forcing_reads_each_image_once_per_step_for_all_its_captions(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = make_decoder(positions=True)
    images, captions = torch.randn(2, 9, 12), torch.randint(4, 30, (5, 6))
    memories: list[Memory] = []
    init_state = decoder.init_state

    def recorded(*args: object) -> tuple[Memory, object]:
        memory, state = init_state(*args)
        memories.append(memory)
        return memory, state

    monkeypatch.setattr(decoder, "init_state", recorded)
    select = Memory.select

    def views_only(memory: Memory, images: torch.Tensor | slice) -> Memory:
        if not isinstance(images, slice):
            pytest.fail("a copy of the image per caption")
        return select(memory, images)

    monkeypatch.setattr(Memory, "select", views_only)
    logits, _ = decoder(images, captions, torch.tensor([0, 0, 1, 0, 1]))
    assert logits.shape[0] == 5
    (memory,) = memories
    assert memory.rows_per_image == 3 and memory.keys.shape[0] == 2 and memory.features.shape[0] == 2


def test_feature_projection_is_computed_once_per_image_during_search() -> None:
    decoder = make_decoder()
    calls: list[tuple[int, ...]] = []
    decoder.attention_features.register_forward_hook(lambda _m, inputs, _o: calls.append(tuple(inputs[0].shape)))
    context_maps: list[tuple[int, ...]] = []
    decoder.output_context.register_forward_hook(lambda _m, inputs, _o: context_maps.append(tuple(inputs[0].shape)))
    with torch.no_grad():
        search(decoder, torch.randn(4, 9, 12), SearchOptions(beam_size=3, max_length=6))
    assert len(calls) == 1, "W_a a_i must be cached, not recomputed at each step"
    assert calls[0] == (4, 9, 12), "once per image, not once per beam"
    assert context_maps == [(4, 9, 12)], "L_z is applied to the regions once per image, never to a step's context"


def test_dropout_is_active_only_in_training_mode() -> None:
    decoder = make_decoder()
    features, captions = torch.randn(2, 9, 12), torch.randint(4, 30, (2, 6))
    decoder.train()
    torch.manual_seed(1)
    first, _ = decoder(features, captions)
    torch.manual_seed(2)
    second, _ = decoder(features, captions)
    assert not torch.allclose(first, second)
    decoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(decoder(features, captions)[0], decoder(features, captions)[0])


def test_loss_is_the_papers_cost_per_word_ignoring_padding() -> None:
    logits = torch.randn(2, 4, 30)
    targets = torch.tensor([[5, 6, 2, 0], [7, 2, 0, 0]])
    alphas = torch.softmax(torch.randn(2, 4, 9), dim=2)
    total, cross_entropy = caption_loss(logits, targets, alphas, attention_penalty=0.7)
    mask = targets != 0
    expected_ce = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(cross_entropy, expected_ce)
    coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)
    # Xu et al.'s cost summed over the batch, -sum log p + lambda sum_i (1 - sum_t alpha_ti)^2 for each
    # caption, divided by the words predicted (5): lambda keeps its ratio to the summed cross-entropy.
    summed_ce = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
    summed_penalty = ((1 - coverage) ** 2).sum()
    torch.testing.assert_close(total, (summed_ce + 0.7 * summed_penalty) / 5)
    changed_padding = logits.clone()
    changed_padding[1, 3] = 100.0  # a padded position: must not change the loss
    torch.testing.assert_close(caption_loss(changed_padding, targets, alphas, 0.7)[0], total)
    without, _ = caption_loss(logits, targets, alphas, attention_penalty=0.0)
    torch.testing.assert_close(without, expected_ce)


def test_invalid_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="cell"):
        DecoderConfig(vocab_size=10, feature_dim=4, cell="transformer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_layers"):
        DecoderConfig(vocab_size=10, feature_dim=4, num_layers=0)
    with pytest.raises(ValueError, match="dropout"):
        DecoderConfig(vocab_size=10, feature_dim=4, dropout=1.0)
    with pytest.raises(ValueError, match="key_channels"):
        DecoderConfig(vocab_size=10, feature_dim=4, key_channels=5)
