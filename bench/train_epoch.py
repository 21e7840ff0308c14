"""Time per epoch and peak memory of cross-entropy training against self-critical training.

    python bench/train_epoch.py [--xe-config training/configs/flickr8k.toml]
                                [--scst-config training/configs/flickr8k-scst.toml]
                                [--init-from runs/flickr8k/best] [--steps 20] [--threads 2]

Each objective runs in a process of its own, on its shipped configuration and the feature cache the
configuration names (built first if missing): the run is set up by ``training.train.prepare_run``, then
``--steps`` optimisation steps of the first epoch's batches are timed with the training loop's own
``train_one_epoch`` (after two untimed steps), and the process's peak resident memory is read when it
ends. That peak counts the pages of the memory-mapped feature cache the timed steps read, so it grows
with ``--steps``. The time of a whole epoch's training part is the mean step time times the epoch's steps;
validation (beam search over the dev images) is the same work for both objectives and is not timed.
``--init-from`` starts both from the same model (self-critical training needs one; the default is
the shipped ``weights/default``). The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from training.config import load_config
from training.distributed import Distributed
from training.state import Progress
from training.train import epoch_batches, epoch_function, prepare_run, seed_everything

REPO_ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 2


def time_steps(config_path: Path, init_from: str, steps: int, threads: int) -> dict[str, float]:
    """Set a run up from ``config_path`` and time ``steps`` of its first epoch's optimisation steps."""
    config = load_config(config_path, [f'train.init_from="{init_from}"', "train.workers=0"])
    tc, device, d = config.train, torch.device("cpu"), Distributed()
    torch.set_num_threads(threads)
    seed_everything(tc.seed)
    trainer, data, module = prepare_run(config, d, device)
    batches = epoch_batches(data, tc, Progress(), d)
    epoch = epoch_function(tc)

    def train(some: list) -> float:
        start = time.perf_counter()
        epoch(
            module,
            trainer.model,
            trainer.optimizer,
            trainer.scaler,
            data,
            some,
            Progress(),
            tc,
            device,
            lambda *_: None,
            False,
        )
        return time.perf_counter() - start

    train(batches[:WARMUP_STEPS])
    seconds = train(batches[WARMUP_STEPS : WARMUP_STEPS + steps])
    return {
        "objective": tc.objective,
        "batch": tc.batch_size,
        "steps_per_epoch": len(batches),
        "seconds_per_step": seconds / steps,
        "epoch_train_minutes": seconds / steps * len(batches) / 60,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # kilobytes on Linux
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--xe-config", type=Path, default=REPO_ROOT / "training" / "configs" / "flickr8k.toml")
    parser.add_argument("--scst-config", type=Path, default=REPO_ROOT / "training" / "configs" / "flickr8k-scst.toml")
    parser.add_argument("--init-from", default=str(REPO_ROOT / "weights" / "default"), help="the model both start from")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each objective (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # a child process: time this config alone
    args = parser.parse_args(argv)
    if args.one is not None:
        result = time_steps(args.one, args.init_from, args.steps, args.threads)
        print(json.dumps(result))
        return result
    results = {}
    for name, config in (("xe", args.xe_config), ("scst", args.scst_config)):
        command = [sys.executable, __file__, "--one", str(config), "--init-from", args.init_from]
        command += ["--steps", str(args.steps), "--threads", str(args.threads)]
        finished = subprocess.run(command, capture_output=True, text=True, check=True)
        results[name] = json.loads(finished.stdout.strip().splitlines()[-1])
        r = results[name]
        print(
            f"{name:>4}: {r['steps_per_epoch']} steps of {r['batch']} per epoch, {r['seconds_per_step']:.2f} s a step, "
            f"{r['epoch_train_minutes']:.1f} min an epoch's training, peak RSS {r['peak_rss_gib']:.2f} GiB"
        )
    results["ratio_epoch_time"] = results["scst"]["epoch_train_minutes"] / results["xe"]["epoch_train_minutes"]
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
