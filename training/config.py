"""The configuration of a training run: ``TrainConfig`` and ``RunConfig``, read from a TOML file with
``[encoder]``, ``[decoder]`` and ``[train]`` sections, then ``--set SECTION.KEY=VALUE`` overrides, then
the dedicated command-line flags; and the command line that repeats a run."""

from __future__ import annotations

import argparse
import shlex
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from captioner.config import DecoderConfig, EncoderConfig, ModelConfig
from captioner.encoder import feature_dim_for
from captioner.errors import CaptionerError
from training.datasets import FORMATS

SCORE = "CIDEr"  # the validation score that picks the best model, decays the rate and stops early
AMP_MODES = ("auto", "off", "fp16", "bf16")
OBJECTIVES = ("xe", "scst")  # cross-entropy; self-critical training on CIDEr-D (training/scst.py)
BASELINES = ("greedy", "mean")  # of self-critical training: the greedy caption's reward, the other samples' mean


class ConfigError(CaptionerError, ValueError):
    """A configuration file or override that cannot be used; the message says which key and why."""

    code = "invalid_config"


@dataclass(frozen=True)
class TrainConfig:
    """Data, optimisation and bookkeeping. Paths are relative to the working directory."""

    data: str = ""  # annotation file: Karpathy JSON, raw COCO captions JSON or Flickr8k.token.txt
    images: str = ""  # the folder the annotation file's image paths are relative to
    format: str = "auto"  # one of training.datasets.FORMATS
    val_data: str = ""  # a separate validation annotation file (raw COCO); empty: the val split of ``data``
    val_images: str = ""  # its image folder; empty: ``images``
    out: str = "runs/train"
    cache_dir: str = ""  # feature caches; empty: ``feature-cache`` beside the annotation file
    # With encoder.fine_tune_stages > 0: cache the frozen stages' output once and train the last stages
    # on it, in place of decoding and encoding every image at every step (no fine_grid).
    cache_frozen_stages: bool = False
    init_from: str = ""  # a model directory whose weights (and vocabulary) start the run
    name: str = "captioner"
    version: str = "1"
    epochs: int = 20
    batch_size: int = 64
    decoder_lr: float = 4e-4
    encoder_lr: float = 1e-4
    grad_clip: float = 5.0  # on the global gradient norm; 0 disables clipping
    attention_penalty: float = 1.0  # lambda of the doubly stochastic attention penalty
    max_caption_length: int = 50  # training captions are cut to this many words
    min_word_count: int = 5
    lr_factor: float = 0.5
    lr_patience: int = 2  # epochs without a better val score before the learning rates decay
    # The last N of ``epochs`` take the learning rates linearly from where they stand to 0, step by
    # step, in place of the plateau rule (0: the plateau rule to the end).
    lr_decay_epochs: int = 0
    patience: int = 6  # epochs without a better val score before training stops (0: never stop early)
    val_beam_size: int = 3
    val_max_length: int = 20
    val_limit: int = 0  # caption only the first N val images each epoch (0: all)
    seed: int = 0
    workers: int = 2
    threads: int = 0  # CPU threads per process (0: torch's default, one per core)
    feature_batch_size: int = 32
    device: str = "auto"
    amp: str = "auto"  # mixed precision on CUDA: auto (bf16 where supported, else fp16), fp16, bf16, off
    checkpoint_every: int = 0  # also write last.pt every N steps (0: only at the end of each epoch)
    log_every: int = 10  # steps between TensorBoard loss points
    dist_timeout_minutes: int = 240  # long enough for rank 0 to build a COCO feature cache
    progress: bool = True
    # "xe": cross-entropy on the reference captions; "scst": self-critical training on CIDEr-D
    # (training/scst.py), which fine-tunes the model of ``init_from``.
    objective: str = "xe"
    scst_samples: int = 5  # captions sampled per image
    scst_baseline: str = "greedy"  # one of BASELINES
    scst_max_length: int = 16  # most words of a sampled caption

    def __post_init__(self) -> None:
        positive = (
            "epochs",
            "batch_size",
            "max_caption_length",
            "min_word_count",
            "val_beam_size",
            "val_max_length",
            "feature_batch_size",
            "log_every",
            "dist_timeout_minutes",
            "scst_max_length",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "grad_clip",
            "attention_penalty",
            "lr_patience",
            "lr_decay_epochs",
            "patience",
            "val_limit",
            "workers",
            "threads",
            "checkpoint_every",
            "seed",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not (self.decoder_lr > 0 and self.encoder_lr > 0 and 0 < self.lr_factor < 1):
            raise ValueError("learning rates must be positive and lr_factor must lie in (0, 1)")
        if self.lr_decay_epochs > self.epochs:
            raise ValueError(f"lr_decay_epochs ({self.lr_decay_epochs}) must not exceed epochs ({self.epochs})")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")
        if self.scst_baseline not in BASELINES:
            raise ValueError(f"scst_baseline must be one of {', '.join(BASELINES)}")
        if not 2 <= self.scst_samples <= 50:
            raise ValueError("scst_samples must lie in [2, 50]")


@dataclass(frozen=True)
class RunConfig:
    encoder: EncoderConfig
    decoder: dict[str, Any]  # DecoderConfig fields but vocab_size and feature_dim, known once data is read
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": asdict(self.encoder), "decoder": dict(self.decoder), "train": asdict(self.train)}

    def model_config(self, vocab_size: int) -> ModelConfig:
        feature_dim = feature_dim_for(self.encoder)
        decoder = DecoderConfig(vocab_size=vocab_size, feature_dim=feature_dim, **self.decoder)
        return ModelConfig(self.encoder, decoder)


def load_config(path: Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read the TOML file and apply ``SECTION.KEY=VALUE`` overrides (VALUE is read as TOML, falling
    back to a plain string, so ``train.decoder_lr=1e-3`` is a number and ``train.out=runs/x`` a path)."""
    try:
        with open(path, "rb") as stream:
            data = tomllib.load(stream)
    except OSError as error:
        raise ConfigError(f"cannot read the configuration {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    unknown = set(data) - {"encoder", "decoder", "train"}
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)}; use [encoder], [decoder] and [train]")
    for item in overrides:
        apply_override(data, item)
    decoder = dict(data.get("decoder", {}))
    for derived in ("vocab_size", "feature_dim"):
        if derived in decoder:
            raise ConfigError(f"decoder.{derived} comes from the data and the backbone; do not set it")
    encoder = _build(EncoderConfig, data.get("encoder", {}), "encoder")
    try:
        feature_dim = feature_dim_for(encoder)
    except ValueError as error:  # an unknown backbone
        raise ConfigError(f"[encoder]: {error}") from None
    _build(DecoderConfig, decoder | {"vocab_size": 4, "feature_dim": feature_dim}, "decoder")  # validates the fields
    return RunConfig(
        encoder=encoder,
        decoder=decoder,
        train=_build(TrainConfig, data.get("train", {}), "train"),
    )


def apply_override(data: dict[str, Any], item: str) -> None:
    key, equals, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not equals or not dot or not name or section not in ("encoder", "decoder", "train"):
        raise ConfigError(f"override {item!r} is not SECTION.KEY=VALUE with SECTION encoder, decoder or train")
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text
    data.setdefault(section, {})[name] = value


def _build(kind: type, values: dict[str, Any], section: str) -> Any:
    """A config dataclass from TOML values: unknown keys and wrongly typed values are refused (the
    string ``"none"`` stands for None, which TOML cannot write, where the default is None)."""
    defaults = {f.name: f.default for f in fields(kind)}
    types = {f.name: f.type for f in fields(kind)}
    unknown = set(values) - set(defaults)
    if unknown:
        raise ConfigError(f"unknown [{section}] keys: {sorted(unknown)}")
    checked = {}
    for name, value in values.items():
        default = defaults[name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:  # None default or a required field: the dataclass checks it
            ok = True
        if value == "none" and "None" in str(types[name]):
            value, ok = None, True
        if not ok:
            raise ConfigError(f"{section}.{name} must be a {type(default).__name__}, not {value!r}")
        checked[name] = value
    try:
        return kind(**checked)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"[{section}]: {error}") from None


_FLAG_KEYS = (
    "data",
    "images",
    "out",
    "epochs",
    "device",
    "seed",
    "workers",
    "checkpoint_every",
    "cache_dir",
    "init_from",
)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The TOML file, then ``--set`` overrides, then the dedicated flags."""
    overrides = list(args.overrides)
    for key in _FLAG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            overrides.append(f"train.{key}={_toml_literal(value)}")
    if getattr(args, "no_progress", False):
        overrides.append("train.progress=false")
    return load_config(args.config, overrides)


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run, rebuilt from the parsed arguments (so it is right however
    ``main`` was called: console script, ``python -m`` or from Python)."""
    parts = ["captioner-train", "--config", str(args.config)]
    for item in args.overrides:
        parts += ["--set", item]
    for key in _FLAG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            parts += ["--" + key.replace("_", "-"), str(value)]
    for flag in ("resume", "no_progress", "debug_replica_checksums"):
        if getattr(args, flag, False):
            parts.append("--" + flag.replace("_", "-"))
    return shlex.join(parts)


def _toml_literal(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)
