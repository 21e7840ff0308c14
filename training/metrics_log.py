"""The log of a run's progress: ``metrics.csv`` (one row per epoch) and TensorBoard events. (The
caption metrics themselves are ``training.metrics``.)"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from training.state import Progress

CSV_COLUMNS = (
    "epoch",
    "global_step",
    "train_loss",
    "train_cross_entropy",
    "train_reward",
    "decoder_lr",
    "encoder_lr",
    "Bleu_1",
    "Bleu_2",
    "Bleu_3",
    "Bleu_4",
    "ROUGE_L",
    "CIDEr",
    "best_CIDEr",
    "grad_norm",  # the epoch's mean global gradient norm before clipping
    "grad_norm_max",
    "seconds",
)


class MetricsLog:
    """``metrics.csv`` (one row per epoch) and TensorBoard events; rank 0 only. On resume, rows and
    events from beyond the restored point are dropped, so a replayed epoch is not logged twice."""

    def __init__(self, out: Path, progress: Progress) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: only rank 0 logs

        self.csv_path = out / "metrics.csv"
        rows = self._read_rows()
        kept = [row for row in rows if int(row["epoch"]) <= progress.epoch]
        with self.csv_path.open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        purge = progress.global_step if progress.global_step else None
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge)

    def _read_rows(self) -> list[dict[str, str]]:
        if not self.csv_path.is_file():
            return []
        with self.csv_path.open(newline="", encoding="utf-8") as stream:
            return list(csv.DictReader(stream))

    def step(self, step: int, loss: float, second: float, grad_norm: float, second_name: str = "cross_entropy") -> None:
        """The step's loss, ``second`` (its cross-entropy, or for self-critical training its mean
        reward) and its global gradient norm before clipping."""
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar(f"train/{second_name}", second, step)
        self.writer.add_scalar("train/grad_norm", grad_norm, step)

    def epoch(self, row: dict[str, Any]) -> None:
        with self.csv_path.open("a", newline="", encoding="utf-8") as stream:
            csv.DictWriter(stream, fieldnames=CSV_COLUMNS).writerow({k: row.get(k, "") for k in CSV_COLUMNS})
        for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
            self.writer.add_scalar(f"val/{key}", row[key], row["global_step"])
        self.writer.add_scalar("train/epoch_loss", row["train_loss"], row["global_step"])
        self.writer.add_scalar("lr/decoder", row["decoder_lr"], row["global_step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
