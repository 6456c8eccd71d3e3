"""Checkpoint directories: round trip, atomic replacement, metadata, clear errors, no pickle."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cris_model.backbone import tokenize
from cris_model.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from cris_model.cli import main
from cris_model.config import get_preset
from cris_model.model import CRIS, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> CRIS:
    torch.manual_seed(0)
    model = build_model(get_preset("cris_tiny", word_len=12)).train()
    with torch.no_grad():  # move BatchNorm running stats off their defaults
        model(torch.randn(4, 3, 96, 96), tokenize(["a", "b", "c", "d"], 12))
    return model.eval()


def _outputs(model: CRIS) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(2, 3, 96, 96), tokenize(["the red circle", "a square"], 12))


def test_round_trip_restores_outputs_and_metadata(tmp_path: Path, tiny: CRIS) -> None:
    path = save_checkpoint(tmp_path / "best", tiny, metrics={"mIoU": 0.5}, extra={"epoch": 3})
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "extra.json", "metrics.json", "model.safetensors", "tokenizer.json",
    ]
    loaded = load_checkpoint(path)
    assert not loaded.training
    assert loaded.config == tiny.config
    assert torch.allclose(_outputs(loaded), _outputs(tiny), atol=1e-6)
    meta = read_checkpoint_meta(path)
    assert meta["config"] == tiny.config.to_dict()
    assert meta["tokenizer"]["word_len"] == 12 and meta["tokenizer"]["eot_id"] == 49407
    assert meta["metrics"] == {"mIoU": 0.5} and meta["extra"] == {"epoch": 3}


def test_save_replaces_an_existing_checkpoint_and_leaves_no_temporaries(
    tmp_path: Path, tiny: CRIS
) -> None:
    path = tmp_path / "last"
    save_checkpoint(path, tiny, metrics={"mIoU": 0.1})
    save_checkpoint(path, tiny, metrics={"mIoU": 0.2})
    assert read_checkpoint_meta(path)["metrics"] == {"mIoU": 0.2}
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_loading_never_fetches_the_recorded_pretrained_weights(tmp_path: Path, tiny: CRIS) -> None:
    recorded = dataclasses.replace(tiny.config, pretrained="/nowhere/clip.safetensors",
                                   random_init=False)
    tiny.config = recorded
    try:
        path = save_checkpoint(tmp_path / "ck", tiny)
    finally:
        tiny.config = dataclasses.replace(recorded, pretrained="", random_init=True)
    loaded = load_checkpoint(path)
    assert loaded.config.pretrained == "/nowhere/clip.safetensors"
    assert torch.allclose(_outputs(loaded), _outputs(tiny), atol=1e-6)


def test_missing_pieces_name_the_path(tmp_path: Path, tiny: CRIS) -> None:
    with pytest.raises(FileNotFoundError, match="absent"):
        load_checkpoint(tmp_path / "absent")
    path = save_checkpoint(tmp_path / "ck", tiny)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path / "ck2", tiny)
    (path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        read_checkpoint_meta(path)


def test_corrupt_files_are_value_errors(tmp_path: Path, tiny: CRIS) -> None:
    path = save_checkpoint(tmp_path / "ck", tiny)
    (path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "ck", tiny)
    (path / "config.json").write_text(json.dumps({"word_len": 12, "layers": 3}), "utf-8")
    with pytest.raises(ValueError, match="unknown model config keys: layers"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "ck", tiny)
    (path / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ValueError, match="unreadable safetensors"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "ck", tiny)
    state = {k: v.contiguous() for k, v in tiny.state_dict().items() if "projector" not in k}
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="do not fit config.json"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "ck", tiny)
    (path / "tokenizer.json").write_text(json.dumps({"word_len": 17}), "utf-8")
    with pytest.raises(ValueError, match="word_len 17"):
        load_checkpoint(path)


def test_cli_inspect_prints_the_metadata(tmp_path: Path, tiny: CRIS) -> None:
    path = save_checkpoint(tmp_path / "ck", tiny, metrics={"mIoU": 0.7})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["model", "inspect", str(path)]) == 0
    meta = json.loads(out.getvalue())
    assert meta["metrics"] == {"mIoU": 0.7} and meta["config"]["preset"] == "cris_tiny"
