"""How far back a word's error reaches: the gradient of one word's cross-entropy with respect to the
decoder's hidden state at each earlier step.

Usage::

    python -m training.gradient_flow --checkpoint MODEL_DIR --data ANNOTATIONS --images IMAGE_DIR \\
        [--format flickr8k] [--split val] [--length 12] [--count 200]

For each of ``--count`` images of the split, one of its captions of exactly ``--length`` words (with
no word outside the model's vocabulary) is read teacher-forced, dropout off, and the loss of its last
word w_n is differentiated with respect to every step's top hidden state h_t (t = 1 .. n; h_n is the
state that predicts w_n). Printed for each distance d = n - t: the median over captions, and the 10th
and 90th percentiles, of ||dl/dh_t|| / ||dl/dh_n||. A plain tanh RNN passes the gradient back through
one tanh derivative and one product with its recurrent weights per step, so the ratio tends to fall
(or grow) geometrically with d; the LSTM's cell adds to itself, and its gradient can travel along that
sum. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from captioner.checkpoint import load_model
from captioner.decoder import Decoder, Memory, State, Step
from captioner.errors import CaptionerError
from captioner.vocab import PAD_ID, Vocabulary
from training.datasets import FORMATS, ImageRecord, load_records


@contextlib.contextmanager
def recorded_hidden_states(decoder: Decoder) -> Iterator[list[torch.Tensor]]:
    """Within the block, every step ``decoder`` takes appends its top hidden state (B, H) to the list
    it yields, with its gradient kept; the decoder's own step function does the work, untouched."""
    recorded: list[torch.Tensor] = []
    advance = decoder.advance

    def recording(embedded: torch.Tensor, state: State, memory: Memory) -> Step:
        step = advance(embedded, state, memory)
        step.hidden.retain_grad()
        recorded.append(step.hidden)
        return step

    decoder.advance = recording  # type: ignore[method-assign]  # this instance only, for the block
    try:
        yield recorded
    finally:
        del decoder.advance


def last_word_gradients(decoder: Decoder, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """For captions (B, n + 2) ``<start> w1 .. wn <end>`` of images ``features`` (B, R, C): the norms
    ||dl_b/dh_t|| (B, n) of caption b's last-word loss l_b = -log p(w_n | w_<n) with respect to each of
    its steps' top hidden states h_1 .. h_n (column n - 1 is h_n, the state that predicts w_n)."""
    n = captions.shape[1] - 2
    if n < 1 or bool((captions[:, 1:] == PAD_ID).any()):
        raise ValueError("captions must hold at least one word, all of the same length, without padding")
    with torch.enable_grad(), recorded_hidden_states(decoder) as hidden:
        logits, _ = decoder(features, captions)  # (B, n + 1, V)
        # Each caption's loss depends on its own row alone, so one backward pass gives every row's gradient.
        loss = F.cross_entropy(logits[:, n - 1], captions[:, n], reduction="sum")
        loss.backward()
    return torch.stack([h.grad.norm(dim=1) for h in hidden[:n]], dim=1)  # (B, n)


def relative_to_last(norms: torch.Tensor) -> np.ndarray:
    """(B, n) gradient norms of h_1 .. h_n -> (B, n) ratios to the last, by distance d = 0 .. n - 1."""
    ratios = norms / norms[:, -1:].clamp_min(torch.finfo(norms.dtype).tiny)  # (B, n)
    return ratios.flip(1).detach().cpu().numpy()  # (B, n), column d is h_{n-d}


def pick_captions(
    records: Sequence[ImageRecord], vocabulary: Vocabulary, length: int, count: int
) -> list[tuple[ImageRecord, list[str]]]:
    """Up to ``count`` images, each with its first caption of exactly ``length`` words, all known."""
    picked = []
    for record in records:
        found = next((c for c in record.captions if len(c) == length and all(w in vocabulary for w in c)), None)
        if found is not None:
            picked.append((record, found))
        if len(picked) == count:
            break
    return picked


def measure(args: argparse.Namespace) -> dict:
    model, info = load_model(args.checkpoint, device="cpu")
    model.eval()  # dropout off: the gradients of the model as it captions
    records = load_records(args.data, args.images, split=args.split, format=args.format)
    picked = pick_captions(records, info.vocabulary, args.length, args.count)
    if not picked:
        raise CaptionerError(f"no caption of {args.length} words in the {args.split} split")
    captions = torch.tensor([info.vocabulary.encode(words) for _, words in picked])  # (B, n + 2)
    norms = []
    for start in range(0, len(picked), args.batch_size):
        batch = picked[start : start + args.batch_size]
        pixels = torch.stack([info.preprocessing.load(record.path) for record, _ in batch])  # (b, 3, S, S)
        with torch.no_grad():
            features = model.encoder(pixels)  # (b, R, C)
        norms.append(last_word_gradients(model.decoder, features, captions[start : start + len(batch)]))
    all_norms = torch.cat(norms)  # (B, n)
    ratios = relative_to_last(all_norms)  # (B, n)
    return {
        "checkpoint": str(args.checkpoint),
        "cell": info.config.decoder.cell,
        "captions": len(picked),
        "length": args.length,
        "median": np.median(ratios, axis=0).tolist(),
        "p10": np.percentile(ratios, 10, axis=0).tolist(),
        "p90": np.percentile(ratios, 90, axis=0).tolist(),
        "last_norm_median": float(all_norms[:, -1].median()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="model directory")
    parser.add_argument("--data", type=Path, required=True, help="annotation file")
    parser.add_argument("--images", type=Path, required=True, help="image folder")
    parser.add_argument("--format", default="auto", help=f"annotation format: {', '.join(FORMATS)} (default: auto)")
    parser.add_argument("--split", default="val", help="split to read captions from (default: val)")
    parser.add_argument("--length", type=int, default=12, help="words per caption (default 12)")
    parser.add_argument("--count", type=int, default=200, help="captions, one per image (default 200)")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args(argv)
    try:
        result = measure(args)
    except CaptionerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{result['cell']}: {result['captions']} captions of {result['length']} words")
    print("distance  median ||dl/dh_t|| / ||dl/dh_n||  (p10, p90)")
    for d, (median, low, high) in enumerate(zip(result["median"], result["p10"], result["p90"], strict=True)):
        print(f"{d:8d}  {median:10.4f}  ({low:.4f}, {high:.4f})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
