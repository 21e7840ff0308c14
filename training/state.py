"""What ``--resume`` saves and restores: ``last.pt`` (weights, optimiser, scheduler, loss scaler, the
progress, every rank's RNG states and the epoch's data order), and the model directories ``best/``
and ``last/`` with their provenance."""

from __future__ import annotations

import functools
import math
import os
import random
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from captioner.checkpoint import ModelInfo, save_model
from captioner.encoder import preprocessing_for
from captioner.model import CaptionModel
from captioner.vocab import Vocabulary
from training.config import SCORE, ConfigError, RunConfig
from training.data import Data
from training.distributed import Distributed, gather

STATE_FORMAT = 1


@dataclass
class Progress:
    """Where training stands; saved in last.pt."""

    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # batches of it already done
    global_step: int = 0
    best_score: float = -math.inf
    stale_epochs: int = 0  # epochs since the best score last improved
    finished: bool = False
    loss_sum: float = 0.0  # over the steps of the epoch in progress
    cross_entropy_sum: float = 0.0  # for self-critical training, of the samples' mean reward
    grad_norm_sum: float = 0.0  # the global gradient norm before clipping
    grad_norm_max: float = 0.0
    order: torch.Tensor | None = None  # the data order of the epoch in progress
    scores: dict[str, float] = field(default_factory=dict)  # the latest val scores

    def record_step(self, loss: float, second: float, grad_norm: float) -> None:
        """Count a finished optimisation step of the epoch in progress."""
        self.loss_sum += loss
        self.cross_entropy_sum += second
        self.grad_norm_sum += grad_norm
        self.grad_norm_max = max(self.grad_norm_max, grad_norm)
        self.step_in_epoch += 1
        self.global_step += 1

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.order = self.epoch + 1, 0, None
        self.loss_sum = self.cross_entropy_sum = self.grad_norm_sum = self.grad_norm_max = 0.0


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser moves: the decoder's and the encoder's unfrozen stages'."""
    return [p for p in model.parameters() if p.requires_grad]


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients down to a global norm of at most ``max_norm`` (0: no clipping); returns
    the norm they had."""
    return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf))


def rng_state() -> dict[str, Any]:
    """Every random stream this process draws from, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Trainer:
    """The objects a checkpoint saves and restores."""

    model: CaptionModel
    optimizer: torch.optim.Optimizer
    scheduler: ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    config: RunConfig
    vocabulary: Vocabulary


def save_state(path: Path, trainer: Trainer, progress: Progress, d: Distributed) -> None:
    """Write last.pt atomically (temporary file, then rename): a crash leaves the previous one.
    Every rank takes part (their RNG states are gathered); only rank 0 writes."""
    rng = gather(d, rng_state())
    if not d.is_main:
        return
    state = {
        "format": STATE_FORMAT,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "progress": {k: v for k, v in asdict(progress).items() if k != "order"},
        "order": progress.order,
        "world_size": d.world_size,
        "rng": rng,
        "vocabulary": list(trainer.vocabulary.tokens),
        "model_config": trainer.model.config.to_dict(),
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def load_state(path: Path, trainer: Trainer, d: Distributed) -> Progress:
    """Restore everything ``save_state`` wrote; refuses a state from another model or world size."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"--resume: there is no {path} to resume from") from None
    except Exception as error:  # torch.load reports a damaged file with many exception types
        raise ConfigError(f"--resume: {path} is not a readable training state: {error}") from None
    if state.get("format") != STATE_FORMAT:
        raise ConfigError(f"--resume: {path} has training-state format {state.get('format')!r}")
    if state["world_size"] != d.world_size:
        raise ConfigError(f"--resume: {path} was written by {state['world_size']} processes, not {d.world_size}")
    if tuple(state["vocabulary"]) != trainer.vocabulary.tokens:
        raise ConfigError(f"--resume: {path} was trained with another vocabulary (different data or min count)")
    if state["model_config"] != trainer.model.config.to_dict():
        raise ConfigError(f"--resume: {path} holds another model configuration than the one given")
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][d.rank])
    return Progress(**state["progress"], order=state["order"])


def save_model_dir(directory: Path, trainer: Trainer, data: Data, progress: Progress, command: str) -> None:
    tc = trainer.config.train
    info = ModelInfo(
        name=tc.name,
        version=tc.version,
        config=trainer.model.config,
        vocabulary=trainer.vocabulary,
        preprocessing=preprocessing_for(trainer.config.encoder),
        provenance={
            "command": command,
            "config": trainer.config.to_dict(),
            "seed": tc.seed,
            "data": data.provenance,
            "git_commit": git_commit(),
            "epochs_trained": progress.epoch + 1,
            "steps": progress.global_step,
        },
        metrics={"val": dict(progress.scores), "val_beam_size": tc.val_beam_size, "score": SCORE},
    )
    save_model(directory, trainer.model, info)


@functools.cache
def git_commit() -> str | None:
    """The commit of the code that trained the model, when it runs from a git checkout. Read once,
    when the run starts (``main``): a commit made while a run trains is not the code it runs."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
