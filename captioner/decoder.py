"""The Show, Attend and Tell decoder (Xu et al., 2015): soft attention over image regions + LSTM/GRU/RNN.

One function, ``Decoder.advance``, advances the decoder by one word. Teacher-forced training
(``Decoder.forward``) calls it on the embedded caption, every decoding mode in ``captioner.decoding``
through ``Decoder.step`` on the words it chose; nothing else computes a decoder step.

Notation: B batch, R regions, C feature channels, A attention size, H hidden size, E embedding size,
L stacked layers, V vocabulary size, T caption length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import DecoderConfig
from captioner.vocab import PAD_ID


@dataclass(frozen=True)
class Memory:
    """What the decoder reads from an image, computed once per image by ``Decoder.init_state``.

    With ``DecoderConfig.positions`` a region's value is ``a_i + P p_i`` (its feature plus its
    embedded grid position). For training the two parts are kept apart: the context is ``sum_i
    alpha_i a_i + P sum_i alpha_i p_i``, the same sum, but the (B, R, C) features then need no
    gradient at any step (training on cached features only learns ``P``), which is most of a step's
    backward cost.

    A projected memory, which only decoding can use, never forms the context. The context enters the
    model only through two linear maps, the first layer's input weights and the deep output's ``L_z``,
    so both are applied to every region's value once per image (``projected``) and a step reads
    ``sum_i alpha_i (W v_i)``: a (B, R, G + E) weighted sum in place of a (B, C) x (C, G + E) product
    per row and per step, which for a small batch on a CPU is bound by reading the weights. Search
    chooses it where it pays (``captioner.decoding._worth_projecting``).

    Several consecutive rows of the decoder's batch may share an image (``rows_per_image``: the beams
    of a beam search); the memory then holds each image once.
    """

    keys: torch.Tensor  # (N, R, A) 2 (W_a v_i + b), doubled for the scores' form (see attention_weights)
    features: torch.Tensor | None  # (N, R, C) region features a_i; None when projected
    positions: torch.Tensor | None  # (R, C) embedded grid positions P p_i, shared by every image
    mean: torch.Tensor | None  # (N, C) mean region value, the context of the "mean" ablation
    projected: torch.Tensor | None = None  # (N, R, G + E) values through the context's linear maps
    rows_per_image: int = 1

    def select(self, images: torch.Tensor | slice) -> Memory:
        """Images in a new order (dropping finished images, captions of the same image); a slice
        keeps views, no copy (teacher forcing leaves the images whose captions have ended)."""

        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[images]

        return Memory(
            self.keys[images], pick(self.features), self.positions, pick(self.mean), pick(self.projected),
            self.rows_per_image,
        )  # fmt: skip

    def one_row_per_image(self) -> Memory:
        """The same memory with each image repeated for each of its rows, so rows can leave one by one."""
        if self.rows_per_image == 1:
            return self
        images = torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(self.rows_per_image)
        return replace(self.select(images), rows_per_image=1)


@dataclass(frozen=True)
class State:
    """The recurrent state of every stacked layer; ``c`` is None for a GRU or a plain RNN."""

    h: torch.Tensor  # (L, B, H)
    c: torch.Tensor | None  # (L, B, H)

    def select(self, rows: torch.Tensor | slice) -> State:
        return State(self.h[:, rows], None if self.c is None else self.c[:, rows])


@dataclass(frozen=True)
class Step:
    """One decoder step: the new state and what the output layer reads (see ``Decoder.logits``)."""

    embedded: torch.Tensor  # (B, E) embedding of the word read at this step, E y_{t-1}
    hidden: torch.Tensor  # (B, H) top layer's new hidden state h_t
    context: torch.Tensor | None  # (B, C) gated context z_t (a plain memory; None with a projected one)
    readout: torch.Tensor | None  # (B, E) L_z z_t as read from a projected memory (None with a plain one)
    state: State
    alpha: torch.Tensor  # (B, R) attention weights of this step


POSITION_FREQUENCIES = (1, 2, 4)
POSITION_FEATURES = 4 * len(POSITION_FREQUENCIES)


def grid_positions(regions: int, like: torch.Tensor) -> torch.Tensor:
    """Fourier features of the centre of each cell of a square grid, row by row: sin and cos of
    pi * k * x and of pi * k * y for x, y in (-1, 1). Shape (R, POSITION_FEATURES)."""
    side = math.isqrt(regions)
    if side * side != regions:
        raise ValueError(f"positions need a square grid of regions, not {regions}")
    centres = (torch.arange(side, device=like.device, dtype=like.dtype) + 0.5) / side * 2 - 1  # (g,)
    y, x = torch.meshgrid(centres, centres, indexing="ij")  # (g, g) each
    angles = [math.pi * k * axis.flatten() for k in POSITION_FREQUENCIES for axis in (x, y)]  # each (R,)
    return torch.stack([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # (R, 4 * K)


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        C, A, H, E, V, L = (
            config.feature_dim,
            config.attention_dim,
            config.hidden_dim,
            config.embed_dim,
            config.vocab_size,
            config.num_layers,
        )
        self.embedding = nn.Embedding(V, E, padding_idx=PAD_ID)
        # Optional: where each region lies, added to its feature. Plain CNN features say little about
        # position, so without this a caption can hardly say "left of" or "above".
        self.position = nn.Linear(POSITION_FEATURES, C, bias=False) if config.positions else None
        # Additive attention: e_ti = w^T tanh(W_a a_i + W_h h_{t-1} + b)
        self.key_channels = config.key_channels or C  # attention keys read the last key_channels channels
        self.attention_features = nn.Linear(self.key_channels, A)
        self.attention_hidden = nn.Linear(H, A, bias=False)
        # Optional: the previous word joins the query (+ W_e E y_{t-1}). Otherwise the map that produces
        # word t is chosen before the decoder knows which word t-1 it emitted, e.g. for "circle" before
        # it knows it said "yellow" rather than "blue", so it cannot look at the yellow object.
        self.attention_word = nn.Linear(E, A, bias=False) if config.word_query else None
        self.attention_score = nn.Linear(A, 1)
        self.gate = nn.Linear(H, 1) if config.gate else None  # beta_t = sigmoid(f_beta(h_{t-1}))
        # Initial state: h_0, c_0 = f_init(mean_i a_i), one slice per layer.
        self.init_h = nn.Linear(C, L * H)
        self.init_c = nn.Linear(C, L * H) if config.cell == "lstm" else None
        # The cells hold the weights (and their checkpoint names); ``_update`` does their math, because
        # decoding reads the first layer's input [E y_{t-1}; z_t] in two parts (see ``_first_layer_input``).
        cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[config.cell]
        self.cells = nn.ModuleList([cell(E + C if i == 0 else H, H) for i in range(L)])
        self.dropout = nn.Dropout(config.dropout)
        if config.deep_output:
            # p(y_t) ~ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t)), equation 7 of the paper.
            self.output_hidden = nn.Linear(H, E)
            self.output_context = nn.Linear(C, E, bias=False)
            self.output = nn.Linear(E, V)
        else:
            self.output = nn.Linear(H, V)

    @property
    def gate_count(self) -> int:
        """G: the width of a cell's gate pre-activations (4H for an LSTM, 3H for a GRU, H for an RNN)."""
        return self.cells[0].weight_ih.shape[0]

    def project_context(self, values: torch.Tensor) -> torch.Tensor:
        """Every linear map the gated context z_t goes through, applied to region values (..., C):
        the first layer's input weights on z_t (..., G), then (deep output) L_z (..., E)."""
        on_context = F.linear(values, self.cells[0].weight_ih[:, self.config.embed_dim :])  # (..., G)
        if not self.config.deep_output:
            return on_context
        # The outputs are joined, not the weights: a weight copy per call would cost more than the
        # products it feeds for a small batch.
        return torch.cat([on_context, self.output_context(values)], dim=-1)  # (..., G + E)

    def init_state(
        self, features: torch.Tensor, rows_per_image: int = 1, projected: bool = False
    ) -> tuple[Memory, State]:
        """The memory of each image of ``features`` (N, R, C) and the first state of its
        ``rows_per_image`` consecutive rows (N * rows_per_image rows). ``projected`` builds the
        memory that only decoding can use (see ``Memory``)."""
        N, C, L, H = features.shape[0], features.shape[2], self.config.num_layers, self.config.hidden_dim
        positions, values = None, features  # values: (N, R, C) a_i (+ P p_i)
        if self.position is not None:
            positions = self.position(grid_positions(features.shape[1], features))  # (R, C)
            values = features + positions  # (N, R, C)
        mean = values.mean(dim=1)  # (N, C)
        # Keys from the last K = key_channels channels, (N, R, K) -> (N, R, A), cached so no step recomputes them.
        keys = self.attention_features(values[..., C - self.key_channels :]).mul_(2)  # (N, R, A)
        h = torch.tanh(self.init_h(mean)).view(N, L, H).transpose(0, 1)  # (L, N, H)
        c = torch.tanh(self.init_c(mean)).view(N, L, H).transpose(0, 1) if self.init_c is not None else None
        state = State(h.contiguous(), None if c is None else c.contiguous())
        if rows_per_image > 1:
            state = state.select(torch.arange(N, device=features.device).repeat_interleave(rows_per_image))
        if projected:
            return Memory(keys, None, None, None, self.project_context(values), rows_per_image), state
        return Memory(keys, features, positions, mean, None, rows_per_image), state

    def attention_weights(self, memory: Memory, h: torch.Tensor, embedded: torch.Tensor | None = None) -> torch.Tensor:
        """Soft attention of the previous top hidden state ``h`` (B, H), and with ``word_query`` of the
        previous word ``embedded`` (B, E), over the regions: alpha (B, R)."""
        N, R, A = memory.keys.shape
        if self.config.attention == "mean":
            return torch.full((h.shape[0], R), 1.0 / R, dtype=h.dtype, device=h.device)  # (B, R)
        query = self.attention_hidden(h)  # (B, A) W_h h
        if self.attention_word is not None:
            if embedded is None:
                raise ValueError("a decoder with word_query attends from the previous word too: pass embedded")
            query = query + self.attention_word(embedded)  # (B, A) W_h h + W_e E y
        # With x = W_a v_i + query + b: tanh(x) = 2 sigmoid(2x) - 1, so w^T tanh(x) + b_w equals
        # 2 w^T sigmoid(2x) up to a constant, which softmax ignores. A CPU computes sigmoid in a third of
        # tanh's time, and this (B, R, A) tensor is most of a step's element-wise work.
        query = query.mul_(2).view(N, -1, 1, A)  # (N, rows per image, 1, A) 2 (W_h h + W_e E y)
        # In place: the sum is needed by nothing else, and a (B, R, A) buffer fewer per step counts.
        squashed = (memory.keys.unsqueeze(1) + query).sigmoid_()  # (N, rows per image, R, A) sigmoid(2x)
        score = self.attention_score
        scores = F.linear(squashed, 2 * score.weight, score.bias)  # (N, rows per image, R, 1)
        return scores.view(-1, R).softmax(dim=1)  # (B, R)

    def _first_layer_input(
        self, embedded: torch.Tensor, memory: Memory, alpha: torch.Tensor, gate: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The first layer's input gates W_i [E y_{t-1}; z_t] + b_i (B, G) for the gated context
        z_t = beta_t sum_i alpha_i v_i, and either z_t (B, C) (a plain memory) or, from a projected one,
        the deep output's L_z z_t (B, E) (None without a deep output)."""
        N, R = memory.keys.shape[:2]
        per_image = alpha.view(N, -1, R)  # (N, rows per image, R)
        first, E = self.cells[0], self.config.embed_dim
        if memory.projected is not None:  # decoding: sum_i alpha_i (W v_i), z_t itself is never formed
            read = torch.bmm(per_image, memory.projected).flatten(0, 1)  # (B, G [+ E])
            if gate is not None:
                read = gate * read
            G = self.gate_count
            input_gates = F.linear(embedded, first.weight_ih[:, :E], first.bias_ih) + read[:, :G]  # (B, G)
            return input_gates, None, (read[:, G:] if self.config.deep_output else None)
        assert memory.features is not None and memory.mean is not None
        if self.config.attention == "mean":
            context = memory.mean.repeat_interleave(memory.rows_per_image, dim=0)  # (B, C)
        else:
            context = torch.bmm(per_image, memory.features).flatten(0, 1)  # (B, C)
            if memory.positions is not None:
                context = context + alpha @ memory.positions  # (B, C)
        if gate is not None:
            context = gate * context  # (B, C) z_t
        input_gates = F.linear(torch.cat([embedded, context], dim=1), first.weight_ih, first.bias_ih)  # (B, G)
        return input_gates, context, None

    @staticmethod
    def _update(
        cell: nn.LSTMCell | nn.GRUCell | nn.RNNCell, input_gates: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer's recurrence from its input's gate pre-activations W_i x_t + b_i (B, G)."""
        hidden_gates = F.linear(h, cell.weight_hh, cell.bias_hh)  # (B, G)
        if c is not None:  # LSTM, gates in PyTorch's order: input, forget, cell, output
            i, f, g, o = (input_gates + hidden_gates).chunk(4, dim=1)  # (B, H) each
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (B, H)
            return torch.sigmoid(o) * torch.tanh(c), c  # (B, H), (B, H)
        if isinstance(cell, nn.RNNCell):  # h_t = tanh(W x_t + b_i + U h_{t-1} + b_h)
            return torch.tanh(input_gates + hidden_gates), None  # (B, H)
        x_r, x_z, x_n = input_gates.chunk(3, dim=1)  # GRU: reset, update, new; (B, H) each
        h_r, h_z, h_n = hidden_gates.chunk(3, dim=1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)  # (B, H)
        n = torch.tanh(x_n + r * h_n)  # (B, H)
        return (1 - z) * n + z * h, None  # (B, H)

    def step(self, tokens: torch.Tensor, state: State, memory: Memory) -> Step:
        """Read the previous word ``tokens`` (B,), attend, update the recurrent state."""
        return self.advance(self.embedding(tokens), state, memory)

    def advance(self, embedded: torch.Tensor, state: State, memory: Memory) -> Step:
        """``step`` on a word already embedded, (B, E). Teacher forcing embeds whole captions at once,
        so the embedding's gradient is built once per batch rather than once per step as a dense
        (V, E) tensor."""
        h_top = state.h[-1]  # (B, H)
        alpha = self.attention_weights(memory, h_top, embedded)  # (B, R)
        gate = torch.sigmoid(self.gate(h_top)) if self.gate is not None else None  # (B, 1) beta_t
        input_gates, context, readout = self._first_layer_input(embedded, memory, alpha, gate)  # (B, G), ...
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            if i > 0:
                input_gates = F.linear(self.dropout(hs[-1]), cell.weight_ih, cell.bias_ih)  # (B, G)
            h, c = self._update(cell, input_gates, state.h[i], None if state.c is None else state.c[i])
            hs.append(h)
            if c is not None:
                cs.append(c)
        new_state = State(torch.stack(hs), torch.stack(cs) if cs else None)  # (L, B, H)
        return Step(embedded, hs[-1], context, readout, new_state, alpha)

    def logits(self, embedded: torch.Tensor, hidden: torch.Tensor, readout: torch.Tensor | None) -> torch.Tensor:
        """The output layer on a step's (..., E), (..., H), (..., E) -> word logits (..., V).

        Nothing here feeds back into the recurrence, so teacher forcing applies it to all time steps
        at once, as a few large matrix multiplies instead of T small ones."""
        if not self.config.deep_output:
            return self.output(self.dropout(hidden))  # (..., V)
        assert readout is not None, "a deep output reads the context's term L_z z_t"
        deep = embedded + self.output_hidden(self.dropout(hidden)) + readout  # (..., E)
        return self.output(self.dropout(deep))  # (..., V)

    def step_logits(self, step: Step) -> torch.Tensor:
        return self.logits(step.embedded, step.hidden, self.readout(step))  # (B, V)

    def readout(self, step: Step) -> torch.Tensor | None:
        """The gated context's term in the deep output, L_z z_t (B, E); None without a deep output."""
        if not self.config.deep_output:
            return None
        return step.readout if step.readout is not None else self.output_context(step.context)

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, image_of_caption: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing. ``captions`` (B, T) holds ``<start> w1 .. wn <end> <pad>..``; the logits
        (B, T-1, V) predict ``captions[:, 1:]``; the attention weights are (B, T-1, R).

        ``features`` is (B, R, C), one image per caption, or (N, R, C) with ``image_of_caption`` (B,)
        giving each caption's image: then each image is read once for all its captions. Its keys and
        initial state are computed once, and every step reads its features once for all its rows,
        as beam search reads them for its beams. A copy per caption would move rows-per-image times
        the memory through each step's context and its backward.

        An image's steps stop once all its captions have ended: images are taken longest caption
        first, so each step runs on the first images alone. Past a caption's end, where the targets
        are <pad> and the loss ignores them, its hidden states, contexts and attention are zero."""
        N, T = features.shape[0], captions.shape[1]
        if image_of_caption is None:
            image_of_caption = torch.arange(N, device=captions.device)
        going = captions[:, 1:] != PAD_ID  # (B, T-1) the positions with a word to predict
        lengths = going.sum(dim=1)  # (B,) words each caption predicts
        image_lengths = lengths.new_zeros(N).scatter_reduce_(0, image_of_caption, lengths, "amax")  # (N,)
        order = torch.argsort(image_lengths, descending=True, stable=True)  # (N,) longest captions first
        if not bool((image_lengths[:-1] >= image_lengths[1:]).all()):  # else already in order: no copy
            rank = torch.empty_like(order)
            rank[order] = torch.arange(N, device=order.device)  # (N,) each image's place in ``order``
            features, image_of_caption = features[order], rank[image_of_caption]  # (N, R, C), (B,)
        slots, rows_per_image = caption_slots(image_of_caption, N)
        # Rows without a caption read <pad> only (its embedding is zero); no output of theirs is kept.
        padded = captions.new_full((N * rows_per_image, T), PAD_ID).index_copy_(0, slots, captions)  # (B', T)
        memory, state = self.init_state(features, rows_per_image)
        embedded = self.embedding(padded[:, :-1])  # (B', T-1, E)
        sorted_lengths = image_lengths[order].tolist()
        steps = []
        for t in range(T - 1):
            images = sum(length > t for length in sorted_lengths)  # those with a caption still going
            if images == 0:
                break
            memory, state = memory.select(slice(images)), state.select(slice(images * rows_per_image))
            steps.append(self.advance(embedded[: images * rows_per_image, t], state, memory))
            state = steps[-1].state

        kept = going.unsqueeze(2).to(features.dtype)  # (B, T-1, 1)

        def by_caption(values: list[torch.Tensor]) -> torch.Tensor:
            """Per-step (rows still going, D) -> (B, T-1, D), zero past each caption's end."""
            rows = len(padded)
            full = [v if len(v) == rows else F.pad(v, (0, 0, 0, rows - len(v))) for v in values]  # (B', D) each
            stacked = torch.stack(full, dim=1)  # (B', steps, D)
            return F.pad(stacked, (0, 0, 0, T - 1 - stacked.shape[1]))[slots] * kept  # (B, T-1, D)

        hidden = by_caption([s.hidden for s in steps])  # (B, T-1, H)
        alphas = by_caption([s.alpha for s in steps])  # (B, T-1, R)
        # L_z once for all steps: one large product instead of T-1 small ones.
        readout = self.output_context(by_caption([s.context for s in steps])) if self.config.deep_output else None
        return self.logits(embedded[slots], hidden, readout), alphas  # (B, T-1, V), (B, T-1, R)


def caption_slots(image_of_caption: torch.Tensor, images: int) -> tuple[torch.Tensor, int]:
    """The row of each caption (B,) when each of ``images`` images gets the same number K of
    consecutive rows, its captions in their order first, then rows without one; and K."""
    counts = torch.bincount(image_of_caption, minlength=images)  # (N,)
    order = torch.argsort(image_of_caption, stable=True)  # (B,) captions grouped by image
    first = torch.cumsum(counts, 0) - counts  # (N,) where each image's captions start in ``order``
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device=order.device)  # (B,) each caption's place in ``order``
    rank = position - first[image_of_caption]  # (B,) among its image's captions
    rows_per_image = int(counts.max())
    return image_of_caption * rows_per_image + rank, rows_per_image


def caption_loss(
    logits: torch.Tensor, targets: torch.Tensor, alphas: torch.Tensor, attention_penalty: float, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Xu et al.'s cost, -log P(y|a) + lambda sum_i (1 - sum_t alpha_ti)^2 per caption, summed over the
    batch and divided by the number of words predicted: the mean cross-entropy per word plus lambda
    times the doubly stochastic penalty per word. Dividing both terms alike keeps the paper's ratio
    between them, so lambda means what it means there (the paper's cost sums a caption's words).
    Returns (total loss, cross-entropy alone)."""
    mask = targets != pad_id  # (B, T-1)
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=pad_id)
    if attention_penalty == 0.0:
        return cross_entropy, cross_entropy
    coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, R) sum_t alpha_ti
    penalty = ((1.0 - coverage) ** 2).sum() / mask.sum().clamp(min=1)  # per word, like the cross-entropy
    return cross_entropy + attention_penalty * penalty, cross_entropy
