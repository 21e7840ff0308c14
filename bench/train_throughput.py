"""Decoder training throughput and model FLOP utilisation (MFU).

    python bench/train_throughput.py [--device cpu|cuda] [--regions 196] [--channels 2048] [--dim 512]
                                     [--vocab-size 10000] [--batch-size 32] [--caption-length 22]
                                     [--captions-per-image 1]

Trains the attention decoder from random features, as training from the feature cache does
(forward, loss with the attention penalty, backward, gradient clipping, Adam step), and reports
tokens per second. By default every caption of the batch has its own image; with
``--captions-per-image 5`` the batch holds 5 captions of each image, as the training script's
batches do, and the per-image work is done (and counted) once per image. MFU is the useful FLOPs
per second of that training (the matrix multiplies of the model, forward and backward, counted in
``training_flops``) over this machine's float32 matrix-multiply FLOP/s. A shared or throttled
machine changes speed from one minute to the next, so the two are measured in alternating rounds
(a matmul window, then a few training iterations) and each round's MFU compares figures taken
seconds apart; the median round is reported. Element-wise work (the attention's squashing,
softmax, the LSTM gates) is not counted as useful. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch

from captioner.config import DecoderConfig
from captioner.decoder import Decoder, caption_loss


def matmul_flops_per_second(device: torch.device, size: int = 2048, seconds: float = 1.0) -> float:
    """The best sustained float32 matrix-multiply rate over the timed groups of a window."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _synchronize(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def training_flops(config: DecoderConfig, regions: int, steps: int, captions: int, images: int) -> float:
    """Matrix-multiply FLOPs of teacher-forcing ``captions`` captions of ``steps`` words of ``images``
    images, forward + backward.

    A product's backward costs twice its forward (the gradients of its input and of its weight), so
    it counts three times in all, except where the input is the frozen encoder's features, which need
    no gradient: the per-image work (W_a a_i, the initial state) and the context alpha^T a count twice.
    The default decoder (gate on, no region positions) is what this counts; torch's FlopCounterMode
    agrees with it exactly (tests/test_bench.py).
    """
    C, A, H, E, V = config.feature_dim, config.attention_dim, config.hidden_dim, config.embed_dim, config.vocab_size
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[config.cell]  # gate pre-activations per hidden unit
    per_image = 2 * regions * C * A + 2 * C * H * (2 if config.cell == "lstm" else 1)  # W_a a_i, init h/c
    context = 2 * regions * C  # alpha^T a
    per_step = (
        2 * H * A  # W_h h
        + 2 * regions * A  # w^T tanh(.)
        + 2 * H  # the gate f_beta(h)
        + 2 * gates * H * (E + C + H)  # the recurrent cell
        + (2 * H * E + 2 * C * E + 2 * E * V if config.deep_output else 2 * H * V)  # output layer
    )
    return 2.0 * per_image * images + (2.0 * context + 3.0 * per_step) * steps * captions


@dataclass(frozen=True)
class Round:
    matmul_flops_per_s: float  # this machine's float32 matmul rate, measured just before the iterations
    seconds_per_iteration: float  # median of the round's training iterations


def measure(args: argparse.Namespace, device: torch.device) -> tuple[list[Round], float]:
    """Alternating rounds of the matmul reference and training iterations, and one iteration's useful FLOPs."""
    config = DecoderConfig(
        vocab_size=args.vocab_size,
        feature_dim=args.channels,
        embed_dim=args.dim,
        attention_dim=args.dim,
        hidden_dim=args.dim,
        dropout=0.5,
    )
    torch.manual_seed(0)
    decoder = Decoder(config).to(device).train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=4e-4, fused=True)  # as training.train uses
    images = -(-args.batch_size // args.captions_per_image)  # the last image may have fewer captions
    features = torch.randn(images, args.regions, args.channels, device=device)
    image_of_caption = None  # one image per caption: the decoder reads the features as they are
    if args.captions_per_image > 1:
        image_of_caption = torch.arange(args.batch_size, device=device) // args.captions_per_image
    captions = torch.randint(4, args.vocab_size, (args.batch_size, args.caption_length), device=device)
    captions[:, 0] = 1

    def iteration() -> float:
        _synchronize(device)
        start = time.perf_counter()
        logits, alphas = decoder(features, captions, image_of_caption)
        loss, _ = caption_loss(logits, captions[:, 1:], alphas, attention_penalty=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
        optimizer.step()
        _synchronize(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        iteration()
    rounds = []
    for _ in range(args.rounds):
        peak = matmul_flops_per_second(device, seconds=args.matmul_seconds)
        rounds.append(Round(peak, statistics.median(iteration() for _ in range(args.iterations))))
    flops = training_flops(config, args.regions, args.caption_length - 1, args.batch_size, images)
    return rounds, flops


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--regions", type=int, default=196)
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512, help="embedding, attention and hidden size")
    parser.add_argument("--vocab-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--caption-length", type=int, default=22, help="tokens, <start> and <end> included")
    parser.add_argument("--captions-per-image", type=int, default=1, help="captions of each image in a batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the matmul reference and training")
    parser.add_argument("--iterations", type=int, default=3, help="training iterations per round")
    parser.add_argument("--matmul-seconds", type=float, default=1.0, help="matmul window per round")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rounds, flops = measure(args, device)
    mfus = [flops / r.seconds_per_iteration / r.matmul_flops_per_s for r in rounds]
    for number, (r, mfu) in enumerate(zip(rounds, mfus, strict=True), 1):
        matmul = r.matmul_flops_per_s / 1e9
        print(f"round {number}: {r.seconds_per_iteration:.4f} s/iteration, matmul {matmul:.1f} GFLOP/s, mfu {mfu:.3f}")
    seconds = statistics.median(r.seconds_per_iteration for r in rounds)
    peak = statistics.median(r.matmul_flops_per_s for r in rounds)
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "captions_per_image": args.captions_per_image,
        "tokens_per_s": round(args.batch_size * (args.caption_length - 1) / seconds, 1),
        "seconds_per_iteration": round(seconds, 4),
        "useful_gflop_per_s": round(flops / seconds / 1e9, 2),
        "matmul_gflop_per_s": round(peak / 1e9, 2),
        "mfu": round(statistics.median(mfus), 3),
    }
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
