"""Self-critical sequence training (Rennie et al., 2017): fine-tune a cross-entropy model on CIDEr-D.

For each training image the model samples K captions; each is rewarded with its CIDEr-D against the
image's references, with document frequencies from all the training references. A sample's
advantage is its reward minus a baseline, either the reward of the image's greedy caption (Rennie et
al.) or the mean reward of the image's other samples (the "new self-critical" variant, which needs no
extra decoding), and the loss is ``-(reward - baseline) * log p(sample)``, the sample's
log-probability summed over its words and its ``<end>``. Samples better than the baseline become
likelier, worse ones less likely.

The samples come from the search (``captioner.decoding``, the one decoding loop) with dropout off;
their log-probabilities are then computed again with gradients by teacher forcing them through the
decoder, with the words the search never says masked as it masks them, so that the gradient is that
of exactly the distribution the samples were drawn from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from captioner.decoding import NEVER_SAID, Hypothesis, SearchOptions, search
from captioner.model import CaptionModel
from captioner.vocab import PAD_ID, START_ID, Vocabulary
from training.metrics import CiderD
from training.state import Progress, clip_gradients, trainable

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.data import Data


class Rewards:
    """CIDEr-D of captions of the training images, document frequencies from all their references."""

    def __init__(self, references: Sequence[Sequence[Sequence[str]]]) -> None:
        self.scorer = CiderD(references)
        self.references = [[self.scorer.vectors(ref) for ref in refs] for refs in references]

    def __call__(self, image: int, words: Sequence[str]) -> float:
        return self.scorer.score(words, self.references[image])


def caption_batch(token_lists: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """``<start> tokens <pad>..`` rows (N, T) for teacher forcing; each token list ends with ``<end>``."""
    captions = torch.full((len(token_lists), 1 + max(map(len, token_lists))), PAD_ID, dtype=torch.long)
    captions[:, 0] = START_ID
    for row, tokens in enumerate(token_lists):
        captions[row, 1 : 1 + len(tokens)] = torch.tensor(tokens)
    return captions.to(device)


def token_log_probs(module: nn.Module, inputs: torch.Tensor, captions: torch.Tensor, per_image: int) -> torch.Tensor:
    """log p of each token (N, T-1) of ``captions`` (N, T), ``per_image`` consecutive rows per image of
    the cached ``inputs`` (B, ...), under the search's distribution; 0 at padding."""
    image_of_caption = torch.arange(inputs.shape[0], device=inputs.device).repeat_interleave(per_image)  # (N,)
    logits, _ = module(inputs, captions, image_of_caption)  # (N, T-1, V)
    logits = logits.float()
    logits[..., NEVER_SAID] = float("-inf")  # the search never says these: not part of its distribution
    targets = captions[:, 1:]  # (N, T-1)
    chosen = logits.log_softmax(dim=2).gather(2, targets.unsqueeze(2)).squeeze(2)  # (N, T-1)
    return chosen.masked_fill(targets == PAD_ID, 0.0)


def sample_log_probs(token_log_prob: torch.Tensor, hypotheses: Sequence[Hypothesis]) -> torch.Tensor:
    """log p(sample) (N,): the sum of its tokens' (N, T-1), up to and including the ``<end>`` the model
    chose. A sample cut at the length limit had its ``<end>`` forced by the search, not drawn: that one is
    left out, or every long sample with a poor reward would teach the model to end captions less."""
    lengths = torch.tensor([len(h.tokens) - h.truncated for h in hypotheses], device=token_log_prob.device)  # (N,)
    positions = torch.arange(token_log_prob.shape[1], device=token_log_prob.device)  # (T-1,)
    return (token_log_prob * (positions < lengths.unsqueeze(1))).sum(dim=1)


def sample_captions(
    model: CaptionModel, features: torch.Tensor, k: int, max_length: int, generator: torch.Generator
) -> list[list[Hypothesis]]:
    """``k`` independent draws per image of ``features`` (B, R, C), repeats allowed: the policy gradient
    needs samples from the model's own distribution, which distinct sampling would skew toward rare
    captions."""
    options = SearchOptions(sample=True, n_best=k, max_length=max_length, distinct=False)
    return search(model.decoder, features, options, generator)


def advantages(rewards: torch.Tensor, baseline: str, greedy_rewards: torch.Tensor | None) -> torch.Tensor:
    """``rewards`` (B, K) minus each image's baseline: its greedy caption's reward (B,) or, for
    ``mean``, the mean reward of its other K-1 samples."""
    if baseline == "greedy":
        assert greedy_rewards is not None
        return rewards - greedy_rewards.unsqueeze(1)  # (B, K)
    k = rewards.shape[1]
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)  # (B, K)
    return rewards - others


def scst_step(
    module: nn.Module,
    model: CaptionModel,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    images: np.ndarray,
    rewards: Rewards,
    vocabulary: Vocabulary,
    tc: TrainConfig,
    generator: torch.Generator,
) -> tuple[float, float, float]:
    """One update on the training images ``images`` (B,) whose cached ``inputs`` are the features
    (B, R, C) or the maps the encoder's trainable stages read; returns the loss, the samples' mean
    reward and the global gradient norm before clipping."""
    k = tc.scst_samples
    with torch.no_grad():
        features = model.encoder.encode_trainable(inputs)  # (B, R, C)
        samples = sample_captions(model, features, k, tc.scst_max_length, generator)  # B lists of K hypotheses
        greedy = (
            search(model.decoder, features, SearchOptions(beam_size=1, max_length=tc.scst_max_length))
            if tc.scst_baseline == "greedy"
            else None
        )
    reward = torch.tensor(
        [
            [rewards(int(image), vocabulary.decode(h.tokens)) for h in found]
            for image, found in zip(images, samples, strict=True)
        ]
    )  # (B, K)
    greedy_reward = (
        torch.tensor(
            [rewards(int(image), vocabulary.decode(g[0].tokens)) for image, g in zip(images, greedy, strict=True)]
        )
        if greedy is not None
        else None
    )  # (B,)
    advantage = advantages(reward, tc.scst_baseline, greedy_reward).flatten().to(features.device)  # (B*K,)
    hypotheses = [h for found in samples for h in found]
    captions = caption_batch([h.tokens for h in hypotheses], features.device)  # (B*K, T)
    log_prob = sample_log_probs(token_log_probs(module, inputs, captions, per_image=k), hypotheses)  # (B*K,)
    loss = -(advantage * log_prob).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(trainable(model), tc.grad_clip)
    optimizer.step()
    return float(loss.detach()), float(reward.mean()), grad_norm


def train_one_epoch(
    module: nn.Module,
    model: CaptionModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    data: Data,
    batches: list[np.ndarray],
    progress: Progress,
    tc: TrainConfig,
    device: torch.device,
    on_step: Callable[[float, float, float], None],
    show_progress: bool = True,
) -> tuple[float, float]:
    """Self-critical training on ``batches`` of training images from ``progress.step_in_epoch`` on, as
    ``training.train.train_one_epoch`` does for cross-entropy; returns the epoch's mean loss and mean
    sample reward. Each step's samples come from a generator seeded by the run's seed and the step, so
    a resumed run draws what the uninterrupted one drew. (``scaler`` is unused: SCST runs in float32.)"""
    model.eval()  # dropout off: the samples and their log-probabilities come from one distribution
    rewards = Rewards(data.train_references)
    remaining = batches[progress.step_in_epoch :]
    bar = tqdm(total=len(batches), initial=progress.step_in_epoch, desc=f"scst epoch {progress.epoch + 1}",
               unit="step", disable=not show_progress)  # fmt: skip
    for images, inputs in zip(remaining, data.train.iterate(remaining), strict=True):
        inputs = inputs.to(device).float()  # self-critical runs train on cached features (or frozen stages' maps)
        generator = torch.Generator(device=device).manual_seed(tc.seed * 1_000_003 + progress.global_step)
        loss, reward, grad_norm = scst_step(
            module, model, optimizer, inputs, images, rewards, data.vocabulary, tc, generator
        )
        progress.record_step(loss, reward, grad_norm)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", reward=f"{reward:.3f}")
        on_step(loss, reward, grad_norm)
    bar.close()
    steps = max(1, len(batches))
    return progress.loss_sum / steps, progress.cross_entropy_sum / steps
