"""The model directory: the one artefact passed between training, the CLI and the service.

    MODEL_DIR/model.safetensors   every weight (encoder and decoder), float32 or float16
    MODEL_DIR/model.json          format version, ModelConfig, vocabulary, preprocessing, name/version,
                                  the search settings it captions with by default, provenance (data,
                                  command, seed) and the model card's scores

Loading never unpickles: weights come only from safetensors, everything else is JSON. A directory
holding pickled weights (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pkl``) instead is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from captioner.config import ModelConfig
from captioner.decoding import SearchOptions
from captioner.encoder import Preprocessing
from captioner.errors import CheckpointError, OptionError
from captioner.model import CaptionModel
from captioner.vocab import Vocabulary

FORMAT = "captioner"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a pickle protocol header; torch.save's zip container
# The search settings a model directory may choose for itself: those that shape what a caption says.
# How many captions, how wide a beam and how long are the caller's (and the service's limits).
DECODING_DEFAULTS = ("length_penalty", "no_repeat_ngram_size", "repetition_penalty")


@dataclass
class ModelInfo:
    """Everything in ``model.json`` besides the weights."""

    name: str
    version: str
    config: ModelConfig
    vocabulary: Vocabulary
    preprocessing: Preprocessing
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # Search settings this model captions with unless a caller says otherwise (``DECODING_DEFAULTS``
    # names which), chosen on the validation split when the model was exported.
    decoding: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.decoding) - set(DECODING_DEFAULTS))
        if unknown:
            raise CheckpointError(f"unknown decoding settings {unknown}; a model may set {list(DECODING_DEFAULTS)}")
        try:
            SearchOptions(**self.decoding)
        except OptionError as error:
            raise CheckpointError(f"the model's decoding settings are invalid: {error}") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "config": self.config.to_dict(),
            "vocabulary": self.vocabulary.to_json(),
            "preprocessing": self.preprocessing.to_json(),
            "provenance": self.provenance,
            "metrics": self.metrics,
            "decoding": self.decoding,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{METADATA_FILE} is not a captioner model description")
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"model format version {data.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
            )
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            config=ModelConfig.from_dict(data["config"]),
            vocabulary=Vocabulary.from_json(data["vocabulary"]),
            preprocessing=Preprocessing.from_json(data["preprocessing"]),
            provenance=dict(data.get("provenance", {})),
            metrics=dict(data.get("metrics", {})),
            decoding=dict(data.get("decoding", {})),
        )


def save_model(
    directory: str | os.PathLike, model: CaptionModel, info: ModelInfo, dtype: torch.dtype = torch.float32
) -> Path:
    """Write the model directory. Each file is written beside its final name and renamed into place,
    ``model.json`` last, so a crash never leaves a directory that loads with mismatched parts."""
    if len(info.vocabulary) != model.config.decoder.vocab_size:
        raise ValueError("the vocabulary size differs from the decoder's vocab_size")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
        for name, tensor in model.state_dict().items()
    }
    _atomic_write(directory / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata={"format": FORMAT}))
    text = json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / METADATA_FILE, lambda path: path.write_text(text, encoding="utf-8"))
    return directory


def _atomic_write(target: Path, write: Any) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp makes owner-only files; a model directory is meant to be shared
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_info(directory: str | os.PathLike) -> ModelInfo:
    """Read and validate ``model.json`` alone (no weights): enough for ``captioner info``."""
    directory = _check_directory(Path(directory))
    try:
        data = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
        return ModelInfo.from_json(data)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{directory / METADATA_FILE} is not a valid model description: {error}") from None


def load_model(directory: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[CaptionModel, ModelInfo]:
    """Build the model from ``model.json`` and fill it from ``model.safetensors``; eval mode, on ``device``."""
    directory = Path(directory)
    info = read_info(directory)
    weights_path = directory / WEIGHTS_FILE
    with weights_path.open("rb") as stream:
        head = stream.read(4)
    if head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(
            f"{weights_path} holds pickled data, which captioner never loads; convert it to safetensors"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {error}") from None
    model = CaptionModel(info.config, pretrained_encoder=False)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not match its configuration: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    wrong_shape = [name for name, tensor in tensors.items() if tensor.shape != expected[name].shape]
    if wrong_shape:
        raise CheckpointError(f"{weights_path} has tensors of the wrong shape: {wrong_shape[:5]}")
    model.load_state_dict({name: tensor.to(expected[name].dtype) for name, tensor in tensors.items()})
    return model.to(device).eval(), info


def _check_directory(directory: Path) -> Path:
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    if not (directory / WEIGHTS_FILE).is_file():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"{directory} holds pickled weights ({', '.join(pickled)}), which captioner never loads; "
                f"it needs {WEIGHTS_FILE} and {METADATA_FILE}"
            )
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}")
    if not (directory / METADATA_FILE).is_file():
        raise CheckpointError(f"{directory} has no {METADATA_FILE}")
    return directory
