"""The Show, Attend and Tell decoder (Xu et al., 2015): soft attention over image regions + LSTM/GRU.

One function, ``Decoder.advance``, advances the decoder by one word. Teacher-forced training
(``Decoder.forward``) calls it on the embedded caption, every decoding mode in ``captioner.decoding``
through ``Decoder.step`` on the words it chose; nothing else computes a decoder step.

Notation: B batch, R regions, C feature channels, A attention size, H hidden size, E embedding size,
L stacked layers, V vocabulary size, T caption length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import DecoderConfig


@dataclass(frozen=True)
class Memory:
    """What the decoder reads from an image, computed once per image by ``Decoder.init_state``.

    With ``DecoderConfig.positions`` a region's value is ``a_i + P p_i`` (its feature plus its
    embedded grid position). The two parts are kept apart: the context is ``sum_i alpha_i a_i +
    P sum_i alpha_i p_i``, the same sum, but the (B, R, C) features then need no gradient at any step
    (training on cached features only learns ``P``), which is most of a step's backward cost.
    """

    features: torch.Tensor  # (B, R, C) region features a_i
    positions: torch.Tensor | None  # (R, C) embedded grid positions P p_i, shared by every image
    keys: torch.Tensor  # (B, R, A) the attention's W_a (a_i + P p_i), cached so no step recomputes it
    mean: torch.Tensor  # (B, C) mean region value, the context of the "mean" ablation

    def select(self, rows: torch.Tensor) -> Memory:
        """Rows of the batch in a new order (beam expansion, dropping finished images, captions of
        the same image)."""
        return Memory(self.features[rows], self.positions, self.keys[rows], self.mean[rows])


@dataclass(frozen=True)
class State:
    """The recurrent state of every stacked layer; ``c`` is None for a GRU."""

    h: torch.Tensor  # (L, B, H)
    c: torch.Tensor | None  # (L, B, H)

    def select(self, rows: torch.Tensor) -> State:
        return State(self.h[:, rows], None if self.c is None else self.c[:, rows])


@dataclass(frozen=True)
class Step:
    """One decoder step: the new state and what the output layer reads (see ``Decoder.logits``)."""

    embedded: torch.Tensor  # (B, E) embedding of the word read at this step, E y_{t-1}
    hidden: torch.Tensor  # (B, H) top layer's new hidden state h_t
    context: torch.Tensor  # (B, C) gated context z_t
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
        self.embedding = nn.Embedding(V, E, padding_idx=0)
        # Optional: where each region lies, added to its feature. Plain CNN features say little about
        # position, so without this a caption can hardly say "left of" or "above".
        self.position = nn.Linear(POSITION_FEATURES, C, bias=False) if config.positions else None
        # Additive attention: e_ti = w^T tanh(W_a a_i + W_h h_{t-1} + b)
        self.attention_features = nn.Linear(C, A)
        self.attention_hidden = nn.Linear(H, A, bias=False)
        self.attention_score = nn.Linear(A, 1)
        self.gate = nn.Linear(H, 1) if config.gate else None  # beta_t = sigmoid(f_beta(h_{t-1}))
        # Initial state: h_0, c_0 = f_init(mean_i a_i), one slice per layer.
        self.init_h = nn.Linear(C, L * H)
        self.init_c = nn.Linear(C, L * H) if config.cell == "lstm" else None
        cell = nn.LSTMCell if config.cell == "lstm" else nn.GRUCell
        self.cells = nn.ModuleList([cell(E + C if i == 0 else H, H) for i in range(L)])
        self.dropout = nn.Dropout(config.dropout)
        if config.deep_output:
            # p(y_t) ~ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t)), equation 7 of the paper.
            self.output_hidden = nn.Linear(H, E)
            self.output_context = nn.Linear(C, E, bias=False)
            self.output = nn.Linear(E, V)
        else:
            self.output = nn.Linear(H, V)

    def init_state(self, features: torch.Tensor) -> tuple[Memory, State]:
        B, L, H = features.shape[0], self.config.num_layers, self.config.hidden_dim
        positions, values = None, features  # values: (B, R, C) a_i (+ P p_i)
        if self.position is not None:
            positions = self.position(grid_positions(features.shape[1], features))  # (R, C)
            values = features + positions  # (B, R, C)
        mean = values.mean(dim=1)  # (B, C)
        keys = self.attention_features(values)  # (B, R, A)
        h = torch.tanh(self.init_h(mean)).view(B, L, H).transpose(0, 1).contiguous()  # (L, B, H)
        c = None
        if self.init_c is not None:
            c = torch.tanh(self.init_c(mean)).view(B, L, H).transpose(0, 1).contiguous()  # (L, B, H)
        return Memory(features, positions, keys, mean), State(h, c)

    def attend(self, memory: Memory, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft attention of the previous top hidden state ``h`` (B, H) over the regions."""
        B, R, _ = memory.features.shape
        if self.config.attention == "mean":
            alpha = torch.full((B, R), 1.0 / R, dtype=h.dtype, device=h.device)  # (B, R)
            return memory.mean, alpha
        query = self.attention_hidden(h).unsqueeze(1)  # (B, 1, A)
        # In place: the sum is needed by nothing else, and a (B, R, A) buffer fewer per step counts.
        scores = self.attention_score((memory.keys + query).tanh_()).squeeze(2)  # (B, R)
        alpha = scores.softmax(dim=1)  # (B, R)
        context = torch.bmm(alpha.unsqueeze(1), memory.features).squeeze(1)  # (B, C)
        if memory.positions is not None:
            context = context + alpha @ memory.positions  # (B, C)
        return context, alpha

    def step(self, tokens: torch.Tensor, state: State, memory: Memory) -> Step:
        """Read the previous word ``tokens`` (B,), attend, update the recurrent state."""
        return self.advance(self.embedding(tokens), state, memory)

    def advance(self, embedded: torch.Tensor, state: State, memory: Memory) -> Step:
        """``step`` on a word already embedded, (B, E). Teacher forcing embeds whole captions at once,
        so the embedding's gradient is built once per batch rather than once per step as a dense
        (V, E) tensor."""
        h_top = state.h[-1]  # (B, H)
        context, alpha = self.attend(memory, h_top)  # (B, C), (B, R)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(h_top)) * context  # (B, C) gated context z_t
        layer_input = torch.cat([embedded, context], dim=1)  # (B, E + C)
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            if i > 0:
                layer_input = self.dropout(hs[-1])  # (B, H)
            if state.c is None:
                h = cell(layer_input, state.h[i])  # (B, H)
            else:
                h, c = cell(layer_input, (state.h[i], state.c[i]))  # (B, H), (B, H)
                cs.append(c)
            hs.append(h)
        new_state = State(torch.stack(hs), torch.stack(cs) if cs else None)  # (L, B, H)
        return Step(embedded, hs[-1], context, new_state, alpha)

    def logits(self, embedded: torch.Tensor, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The output layer on a step's (..., E), (..., H), (..., C) -> word logits (..., V).

        Nothing here feeds back into the recurrence, so teacher forcing applies it to all time steps
        at once, as a few large matrix multiplies instead of T small ones."""
        if not self.config.deep_output:
            return self.output(self.dropout(hidden))  # (..., V)
        deep = embedded + self.output_hidden(self.dropout(hidden)) + self.output_context(context)  # (..., E)
        return self.output(self.dropout(deep))  # (..., V)

    def step_logits(self, step: Step) -> torch.Tensor:
        return self.logits(step.embedded, step.hidden, step.context)  # (B, V)

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, image_of_caption: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing. ``captions`` (B, T) holds ``<start> w1 .. wn <end> <pad>..``; the logits
        (B, T-1, V) predict ``captions[:, 1:]``; the attention weights are (B, T-1, R).

        ``features`` is (B, R, C), one image per caption, or (N, R, C) with ``image_of_caption`` (B,)
        giving each caption's image: then the work done once per image (the attention keys, the
        initial state) is done once for all the captions of that image."""
        memory, state = self.init_state(features)
        if image_of_caption is not None:
            memory, state = memory.select(image_of_caption), state.select(image_of_caption)
        embedded = self.embedding(captions[:, :-1])  # (B, T-1, E)
        steps = []
        for t in range(captions.shape[1] - 1):
            steps.append(self.advance(embedded[:, t], state, memory))
            state = steps[-1].state
        hidden = torch.stack([s.hidden for s in steps], dim=1)  # (B, T-1, H)
        context = torch.stack([s.context for s in steps], dim=1)  # (B, T-1, C)
        logits = self.logits(embedded, hidden, context)  # (B, T-1, V)
        return logits, torch.stack([s.alpha for s in steps], dim=1)  # (B, T-1, V), (B, T-1, R)


def caption_loss(
    logits: torch.Tensor, targets: torch.Tensor, alphas: torch.Tensor, attention_penalty: float, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over non-pad words plus the doubly stochastic attention penalty
    lambda * sum_i (1 - sum_t alpha_ti)^2 (averaged over captions), which pushes the decoder to look
    at every region over the course of a caption. Returns (total loss, cross-entropy alone)."""
    mask = targets != pad_id  # (B, T-1)
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=pad_id)
    if attention_penalty == 0.0:
        return cross_entropy, cross_entropy
    coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, R)
    penalty = ((1.0 - coverage) ** 2).sum(dim=1).mean()
    return cross_entropy + attention_penalty * penalty, cross_entropy
