"""Exporting a model directory as float16 with new metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from captioner.checkpoint import WEIGHTS_FILE, load_model, read_info
from training.export import main


def test_export_writes_a_half_precision_copy_with_new_metadata(tiny_model_dir: Path, tmp_path: Path) -> None:
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"CIDEr": 1.5}))
    out = tmp_path / "shipped"
    argv = ["--checkpoint", str(tiny_model_dir), "--out", str(out), "--dtype", "float16"]
    assert main([*argv, "--name", "shipped", "--version", "2", "--metrics", str(scores)]) == 0
    info = read_info(out)
    assert (info.name, info.version, info.metrics["CIDEr"]) == ("shipped", "2", 1.5)
    assert info.provenance["dtype"] == "float16" and info.vocabulary == read_info(tiny_model_dir).vocabulary
    assert (out / WEIGHTS_FILE).stat().st_size < 0.6 * (tiny_model_dir / WEIGHTS_FILE).stat().st_size
    original, _ = load_model(tiny_model_dir)
    copy, _ = load_model(out)
    for name, tensor in copy.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, original.state_dict()[name].half().float(), rtol=0, atol=0)


def test_export_reports_bad_input(tmp_path: Path, capsys) -> None:
    assert main(["--checkpoint", str(tmp_path / "absent"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "scores.json"
    bad.write_text("[1, 2]")
    assert main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "x"), "--metrics", str(bad)]) == 2
    assert "JSON object" in capsys.readouterr().err
