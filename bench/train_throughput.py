"""Decoder training throughput and model FLOP utilisation (MFU).

    python bench/train_throughput.py [--device cpu|cuda] [--regions 196] [--channels 2048] [--dim 512]
                                     [--vocab-size 10000] [--batch-size 32] [--caption-length 22]

Trains the attention decoder from random features, as training from the feature cache does
(forward, loss with the attention penalty, backward, gradient clipping, Adam step), and reports
tokens per second. MFU is the useful FLOPs per second of that training (the matrix multiplies of
the model, forward and backward, counted in ``training_flops_per_caption``) over this machine's float32
matrix-multiply FLOP/s, measured in the same run. Element-wise work (tanh, softmax, the LSTM gates)
is not counted as useful. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from captioner.config import DecoderConfig
from captioner.decoder import Decoder, caption_loss


def matmul_flops_per_second(device: torch.device, size: int = 2048, seconds: float = 3.0) -> float:
    """The best sustained float32 matrix-multiply rate over a few timed rounds."""
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


def training_flops_per_caption(config: DecoderConfig, regions: int, steps: int) -> float:
    """Matrix-multiply FLOPs of one teacher-forced caption of ``steps`` words, forward + backward.

    Per step the backward pass costs twice the forward (gradients of inputs and of weights). The
    per-image work (W_a a_i and the initial state) reads frozen-encoder features that need no
    gradient, so its backward is the weight gradient alone: twice its forward in all, not three times.
    """
    C, A, H, E, V = config.feature_dim, config.attention_dim, config.hidden_dim, config.embed_dim, config.vocab_size
    gates = 4 if config.cell == "lstm" else 3
    per_image = 2 * regions * C * A + 2 * C * H * (2 if config.cell == "lstm" else 1)  # W_a a_i, init h/c
    per_step = (
        2 * H * A  # W_h h
        + 2 * regions * A  # w^T tanh(.)
        + 2 * regions * C  # context = alpha^T a
        + 2 * gates * H * (E + C + H)  # the recurrent cell
        + (2 * H * E + 2 * C * E + 2 * E * V if config.deep_output else 2 * H * V)  # output layer
    )
    return 2.0 * per_image + 3.0 * steps * per_step


def measure_training(args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """Seconds per iteration (median of the timed ones) and the iteration's useful FLOPs."""
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
    optimizer = torch.optim.Adam(decoder.parameters(), lr=4e-4)
    features = torch.randn(args.batch_size, args.regions, args.channels, device=device)
    captions = torch.randint(4, args.vocab_size, (args.batch_size, args.caption_length), device=device)
    captions[:, 0] = 1
    times = []
    for iteration in range(args.warmup + args.iterations):
        _synchronize(device)
        start = time.perf_counter()
        logits, alphas = decoder(features, captions)
        loss, _ = caption_loss(logits, captions[:, 1:], alphas, attention_penalty=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
        optimizer.step()
        _synchronize(device)
        if iteration >= args.warmup:
            times.append(time.perf_counter() - start)
    flops = args.batch_size * training_flops_per_caption(config, args.regions, args.caption_length - 1)
    return sorted(times)[len(times) // 2], flops


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
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=6)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    peak = matmul_flops_per_second(device)
    seconds, flops = measure_training(args, device)
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "tokens_per_s": round(args.batch_size * (args.caption_length - 1) / seconds, 1),
        "seconds_per_iteration": round(seconds, 4),
        "useful_gflop_per_s": round(flops / seconds / 1e9, 2),
        "matmul_gflop_per_s": round(peak / 1e9, 2),
        "mfu": round(flops / seconds / peak, 3),
    }
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
