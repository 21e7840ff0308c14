"""Copy a model directory for shipping: optionally as float16 (half the size), with a new name,
version and the scores measured on it.

    python -m training.export --checkpoint runs/synthetic/best --out weights/default --dtype float16 \
        [--name NAME] [--version V] [--metrics metrics.json]

The float16 copy is what gets shipped; its scores must then be measured on the copy itself
(``training.evaluate --checkpoint OUT``), which ``--metrics`` records in ``model.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from captioner.checkpoint import load_model, save_model
from captioner.errors import CaptionerError

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def export(
    checkpoint: Path,
    out: Path,
    dtype: str = "float32",
    name: str | None = None,
    version: str | None = None,
    metrics: dict | None = None,
) -> Path:
    model, info = load_model(checkpoint)
    info = replace(
        info,
        name=name or info.name,
        version=version or info.version,
        metrics={**info.metrics, **(metrics or {})},
        provenance={**info.provenance, "exported_from": str(checkpoint), "dtype": dtype},
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
    args = parser.parse_args(argv)
    try:
        metrics = json.loads(args.metrics.read_text(encoding="utf-8")) if args.metrics else None
        if metrics is not None and not isinstance(metrics, dict):
            raise ValueError("it must hold a JSON object")
    except (OSError, ValueError) as error:
        print(f"error: {args.metrics}: {error}", file=sys.stderr)
        return 2
    try:
        written = export(args.checkpoint, args.out, args.dtype, args.name, args.version, metrics)
    except CaptionerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
