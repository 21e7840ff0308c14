"""training.gradient_flow: the gradient of a caption's last-word loss with respect to each step's hidden state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from captioner.config import DecoderConfig
from captioner.decoder import Decoder
from tests.conftest import make_model_dir
from training.gradient_flow import last_word_gradients, main, recorded_hidden_states, relative_to_last


def tiny_decoder(cell: str) -> Decoder:
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=20, feature_dim=12, embed_dim=8, attention_dim=8, hidden_dim=16, dropout=0.0, cell=cell
    )
    return Decoder(config).double().eval()


def step_by_step_gradients(decoder: Decoder, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """The same norms from the decoder's step function called one word at a time."""
    n = captions.shape[1] - 2
    memory, state = decoder.init_state(features)
    hidden = []
    for t in range(n):
        step = decoder.step(captions[:, t], state, memory)
        step.hidden.retain_grad()
        hidden.append(step.hidden)
        state = step.state
    loss = F.cross_entropy(decoder.step_logits(step), captions[:, n], reduction="sum")
    loss.backward()
    return torch.stack([h.grad.norm(dim=1) for h in hidden], dim=1)  # (B, n)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_norms_are_those_of_each_steps_hidden_state_up_to_the_last_word(cell: str) -> None:
    decoder = tiny_decoder(cell)
    features = torch.randn(3, 9, 12, dtype=torch.float64)
    captions = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.randint(4, 20, (3, 6)), torch.full((3, 1), 2)], 1)
    norms = last_word_gradients(decoder, features, captions)
    assert norms.shape == (3, 6)
    assert bool((norms > 0).all())  # every earlier state reaches the last word
    expected = step_by_step_gradients(decoder, features, captions)
    torch.testing.assert_close(norms, expected, rtol=1e-9, atol=0)
    assert "advance" not in vars(decoder)  # the recording is gone after the block


def test_the_recording_ends_with_its_block_even_on_an_error() -> None:
    decoder = tiny_decoder("rnn")
    with pytest.raises(RuntimeError), recorded_hidden_states(decoder) as hidden:
        decoder(torch.randn(1, 9, 12, dtype=torch.float64), torch.tensor([[1, 5, 2]]))
        assert len(hidden) == 2
        raise RuntimeError("stop")
    assert "advance" not in vars(decoder)


def test_padded_or_empty_captions_are_refused() -> None:
    decoder = tiny_decoder("lstm")
    with pytest.raises(ValueError, match="same length"):
        last_word_gradients(
            decoder, torch.randn(2, 9, 12, dtype=torch.float64), torch.tensor([[1, 5, 6, 2], [1, 5, 2, 0]])
        )


def test_ratios_run_back_from_the_last_word() -> None:
    ratios = relative_to_last(torch.tensor([[1.0, 2.0, 4.0], [0.5, 0.5, 0.5]]))
    np.testing.assert_allclose(ratios, [[1.0, 0.5, 0.25], [1.0, 1.0, 1.0]])


def write_karpathy(folder: Path, captions: list[str]) -> Path:
    entries = []
    for index, caption in enumerate(captions):
        Image.new("RGB", (64, 64), (40 * index, 90, 200)).save(folder / f"{index}.png")
        entries.append({"filename": f"{index}.png", "split": "val", "sentences": [{"tokens": caption.split()}]})
    (folder / "data.json").write_text(json.dumps({"images": entries}))
    return folder / "data.json"


def test_the_command_prints_a_ratio_per_distance_and_refuses_a_length_no_caption_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_model_dir(tmp_path / "model", cell="rnn")
    # The third caption has a word the model does not know, the fourth another length: both are passed over.
    data = write_karpathy(tmp_path, ["a red circle", "the blue square", "a pink circle", "a circle"])
    common = ["--checkpoint", str(model), "--data", str(data), "--images", str(tmp_path), "--format", "karpathy"]
    assert main([*common, "--length", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["cell"] == "rnn" and result["captions"] == 2 and result["median"][0] == 1.0
    assert len(result["median"]) == 3 and all(r > 0 for r in result["median"])
    assert main([*common, "--length", "7"]) == 2
    assert "no caption of 7 words" in capsys.readouterr().err
