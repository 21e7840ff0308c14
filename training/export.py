"""Copy a model directory for shipping: optionally as float16 (half the size), with a new name,
version, the scores measured on it and the search settings it captions with by default.

    python -m training.export --checkpoint runs/synthetic/best --out weights/default --dtype float16 \
        [--name NAME] [--version V] [--metrics metrics.json] \
        [--length-penalty P] [--no-repeat-ngram-size N] [--repetition-penalty P]

The float16 copy is what gets shipped; its scores must then be measured on the copy itself
(``training.evaluate --checkpoint OUT``), which ``--metrics`` records in ``model.json``.

The search settings (chosen on the validation split, e.g. with ``training.evaluate --split val``)
become the copy's ``decoding`` in ``model.json``: the values the CLI, the service and the Python API
caption with unless told otherwise. Each one given replaces the source model's own; those not given
keep it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from captioner.checkpoint import load_model, save_model
from captioner.decoding import SearchOptions
from captioner.errors import CaptionerError

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def export(
    checkpoint: Path,
    out: Path,
    dtype: str = "float32",
    name: str | None = None,
    version: str | None = None,
    metrics: dict | None = None,
    decoding: dict | None = None,
) -> Path:
    """Copy ``checkpoint`` to ``out``; ``decoding`` (search settings, see ``DECODING_DEFAULTS``) is
    merged over the source model's own. A bad setting raises ``CheckpointError`` before anything is
    written."""
    model, info = load_model(checkpoint)
    info = replace(
        info,
        name=name or info.name,
        version=version or info.version,
        metrics={**info.metrics, **(metrics or {})},
        provenance={**info.provenance, "exported_from": str(checkpoint), "dtype": dtype},
        decoding={**info.decoding, **(decoding or {})},
    )
    return save_model(out, model, info, dtype=DTYPES[dtype])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="model directory to copy")
    parser.add_argument("--out", type=Path, required=True, help="where to write the copy")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--name")
    parser.add_argument("--version")
    parser.add_argument("--metrics", type=Path, help="a JSON object of scores to store in model.json")
    parser.add_argument(
        "--length-penalty", type=float, metavar="P", help="default score = log p / length**P (default: the source's)"
    )
    parser.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        metavar="N",
        help="default n-gram ban: never say the same N words twice; 0 is off (default: the source's)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="P",
        help="default repetition penalty, >= 1; 1 is off (default: the source's)",
    )
    args = parser.parse_args(argv)
    given: dict[str, Any] = {
        "length_penalty": args.length_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "repetition_penalty": args.repetition_penalty,
    }
    decoding = {key: value for key, value in given.items() if value is not None}
    try:
        SearchOptions(**decoding)  # a bad value is refused before the model is read
    except CaptionerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        metrics = json.loads(args.metrics.read_text(encoding="utf-8")) if args.metrics else None
        if metrics is not None and not isinstance(metrics, dict):
            raise ValueError("it must hold a JSON object")
    except (OSError, ValueError) as error:
        print(f"error: {args.metrics}: {error}", file=sys.stderr)
        return 2
    try:
        written = export(args.checkpoint, args.out, args.dtype, args.name, args.version, metrics, decoding)
    except CaptionerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
