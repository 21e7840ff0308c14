"""Captioning throughput, end to end from preprocessed tensors: encoder + caption search, in images/s.

    python bench/caption_throughput.py --beam-size 3 --compare-batch-sizes 1,32 --images 64

Without --model the model has random weights, built from the flags (default: EfficientNet-Lite0 and a
decoder the size of the default model's, embedding/attention/hidden 512). Random weights would end
captions at arbitrary lengths, so the bias of ``<end>`` in the output layer is set to -1e4: no beam
ever chooses it, and every caption runs to --max-length, where the search ends it. The figures are
therefore a worst case for the given --max-length. With --model the model's own weights decide
caption lengths (add --force-full-length to mask ``<end>`` there too); the table reports the mean
length either way.

With --compare-unprepared the same figures are measured, in the same run, for the encoder as it was
trained (batch norms apart, channels-first), the baseline of ``Encoder.prepare_for_inference``.

The last line printed is one JSON object: ``images_per_s`` for --batch-size and ``by_batch_size``
with the figures of every batch size measured (and ``unprepared_by_batch_size`` with the baseline's).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass

import torch

from captioner import Captioner, CaptionerError
from captioner.api import resolve_device
from captioner.checkpoint import ModelInfo, load_model
from captioner.config import DecoderConfig, EncoderConfig, ModelConfig
from captioner.decoding import SearchOptions
from captioner.encoder import feature_dim_for, preprocessing_for
from captioner.model import CaptionModel
from captioner.vocab import END_ID, SPECIAL_TOKENS, Vocabulary

MASKED_END_BIAS = -1e4  # far below any other logit, yet finite so the forced final <end> has a finite score


@dataclass
class Measurement:
    batch_size: int
    images: int
    seconds: float
    encoder_seconds: float
    mean_words: float
    truncated: float

    def as_json(self) -> dict[str, float | int]:
        return {
            "batch_size": self.batch_size,
            "images": self.images,
            "images_per_s": self.images / self.seconds,
            "ms_per_image": 1000 * self.seconds / self.images,
            "encoder_ms_per_image": 1000 * self.encoder_seconds / self.images,
            "mean_words": self.mean_words,
            "truncated_fraction": self.truncated,
        }


def random_captioner(args: argparse.Namespace, device: torch.device, prepare_encoder: bool = True) -> Captioner:
    encoder = EncoderConfig(
        backbone=args.backbone, image_size=args.image_size, grid_size=args.grid, weights=None, fine_grid=args.fine_grid
    )
    decoder = DecoderConfig(
        vocab_size=args.vocab_size,
        feature_dim=feature_dim_for(encoder),
        embed_dim=args.embed_dim,
        attention_dim=args.attention_dim,
        hidden_dim=args.hidden_dim,
        dropout=0.0,
    )
    config = ModelConfig(encoder=encoder, decoder=decoder)
    torch.manual_seed(0)
    model = CaptionModel(config, pretrained_encoder=False)
    words = tuple(f"w{i}" for i in range(args.vocab_size - len(SPECIAL_TOKENS)))
    info = ModelInfo("random", "0", config, Vocabulary(SPECIAL_TOKENS + words), preprocessing_for(encoder))
    return Captioner(model, info, device, prepare_encoder=prepare_encoder)


def build_captioner(args: argparse.Namespace, prepare_encoder: bool = True) -> tuple[Captioner, bool]:
    """The measured captioner and whether its ``<end>`` is masked."""
    device = resolve_device(args.device)
    if args.model:
        model, info = load_model(args.model, device)
        captioner, masked = Captioner(model, info, device, prepare_encoder=prepare_encoder), args.force_full_length
    else:
        captioner, masked = random_captioner(args, device, prepare_encoder), True
    if masked:
        mask_end_token(captioner)
    return captioner, masked


def mask_end_token(captioner: Captioner) -> None:
    with torch.no_grad():
        captioner.model.decoder.output.bias[END_ID] = MASKED_END_BIAS


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(captioner: Captioner, pixels: torch.Tensor, batch_size: int, options: SearchOptions) -> Measurement:
    device = captioner.device
    batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    captioner.caption_pixels(batches[0].to(device), options)  # warm-up: allocator, kernels, caches
    synchronise(device)

    start = time.perf_counter()
    for batch in batches:
        captioner.encode(batch.to(device))
    synchronise(device)
    encoder_seconds = time.perf_counter() - start

    words, truncated = [], []
    start = time.perf_counter()
    for batch in batches:
        for result in captioner.caption_pixels(batch.to(device), options):
            words.append(len(result.words))
            truncated.append(result.n_best[0].truncated)
    synchronise(device)
    seconds = time.perf_counter() - start
    return Measurement(
        batch_size, len(pixels), seconds, encoder_seconds, sum(words) / len(words), sum(truncated) / len(truncated)
    )


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model directory (default: random weights shaped by the flags below)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, help="input side in pixels (default: the backbone's)")
    parser.add_argument("--grid", type=int, help="feature grid side (default: the backbone's)")
    parser.add_argument("--fine-grid", action="store_true", help="attend over the stride-16 grid")
    parser.add_argument("--vocab-size", type=int, default=10000)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--attention-dim", type=int, default=512)
    parser.add_argument("--hidden-dim", type=int, default=512)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="the batch size whose rate is images_per_s")
    parser.add_argument("--compare-batch-sizes", type=batch_sizes, default=[], help="e.g. 1,32")
    parser.add_argument("--images", type=int, default=64, help="images per measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--force-full-length", action="store_true", help="mask <end> of a --model model too")
    parser.add_argument(
        "--compare-unprepared", action="store_true", help="also measure the encoder without prepare_for_inference"
    )
    args = parser.parse_args()
    if args.images < 1:
        parser.error("--images must be positive")

    try:
        captioner, masked = build_captioner(args)
        baseline = build_captioner(args, prepare_encoder=False)[0] if args.compare_unprepared else None
    except (CaptionerError, ValueError) as error:
        parser.exit(2, f"caption_throughput: error: {error}\n")
    size = captioner.info.preprocessing.image_size
    options = SearchOptions(beam_size=args.beam_size, max_length=args.max_length)
    pixels = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))
    sizes = sorted({args.batch_size, *args.compare_batch_sizes})
    config = captioner.info.config
    device_name = (
        torch.cuda.get_device_name(captioner.device) if captioner.device.type == "cuda" else platform.processor()
    )

    print(
        f"model: {args.model or 'random weights'} | {config.encoder.backbone} {size}px, grid {captioner.grid_size}, "
        f"decoder {config.decoder.embed_dim}/{config.decoder.attention_dim}/{config.decoder.hidden_dim}, "
        f"vocabulary {config.decoder.vocab_size}"
    )
    print(
        f"search: beam {args.beam_size}, max length {args.max_length}, <end> masked: {masked} | "
        f"device: {captioner.device} ({device_name or 'cpu'}), torch threads {torch.get_num_threads()}"
    )
    header = f"{'batch':>6} {'images/s':>10} {'ms/image':>10} {'encoder ms/image':>17} {'mean words':>11}"
    print(header)
    print("-" * len(header))
    results, baseline_results = {}, {}
    for batch_size in sizes:
        measured = [("", captioner, results)]
        if baseline is not None:
            measured.append((" (unprepared encoder)", baseline, baseline_results))
        for label, measured_captioner, table in measured:
            row = measure(measured_captioner, pixels, batch_size, options).as_json()
            table[str(batch_size)] = row
            print(
                f"{batch_size:>6} {row['images_per_s']:>10.2f} {row['ms_per_image']:>10.1f} "
                f"{row['encoder_ms_per_image']:>17.1f} {row['mean_words']:>11.1f}{label}"
            )
    summary = {
        "images_per_s": results[str(args.batch_size)]["images_per_s"],
        "batch_size": args.batch_size,
        "beam_size": args.beam_size,
        "max_length": args.max_length,
        "end_masked": masked,
        "device": str(captioner.device),
        "model": args.model or "random",
        "by_batch_size": results,
    }
    if baseline is not None:
        summary["unprepared_by_batch_size"] = baseline_results
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
