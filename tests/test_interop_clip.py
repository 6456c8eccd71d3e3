"""OpenAI-style CLIP TorchScript archives: weights read without running their code, converted
to safetensors for `model.pretrained`, and archives that need more refused with a way out.

The archive is made here: a scripted module tree that holds cris_tiny's open_clip tensors
under their CLIP names, plus what OpenAI's files also carry (a plain tensor attribute, a
configuration scalar buffer).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from payloads import Exploit, code_pickle
from torch import nn

from cris_model.backbone import create_clip
from cris_model.cli import main
from cris_model.config import get_preset
from cris_model.interop.clip_archive import read_clip_archive
from cris_model.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _scripted(clip: nn.Module) -> torch.jit.ScriptModule:
    """A TorchScript module whose state_dict() is `clip`'s, plus an attribute and a scalar
    buffer that are not CLIP weights."""
    root, buffers = _Holder(), {k for k, _ in clip.named_buffers()}
    for key, value in clip.state_dict().items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, _Holder())
            node = getattr(node, part)
        if key in buffers:
            node.register_buffer(leaf, value.clone())
        else:
            node.register_parameter(leaf, nn.Parameter(value.clone()))
    root.attn_mask = torch.zeros(3, 3)  # a plain tensor attribute, as CLIP's blocks hold one
    root.register_buffer("input_resolution", torch.tensor(128))  # OpenAI's config scalar
    return torch.jit.script(root)


@pytest.fixture(scope="module")
def clip() -> nn.Module:
    torch.manual_seed(0)
    config = get_preset("cris_tiny")
    return create_clip(config.clip_model, config.clip_config, "", True)


@pytest.fixture(scope="module")
def archive(clip: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scripted CLIP saved, then its TorchScript source made to run code if compiled
    (`torch.jit.load` then fails: this reader never compiles it)."""
    root = tmp_path_factory.mktemp("clip")
    saved = root / "saved.pt"
    torch.jit.save(_scripted(clip), saved)
    tampered = root / "TINY.pt"
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(tampered, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/code/" in info.filename and info.filename.endswith(".py"):
                data = data.replace(b"return x", b"return __import__('os').system('touch pwned')")
            dst.writestr(info, data)
    with pytest.raises(RuntimeError):
        torch.jit.load(str(tampered))
    return tampered


def test_convert_reads_exactly_the_weights_and_feeds_model_pretrained(
    clip: nn.Module, archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("TorchScript must not be loaded")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    out = tmp_path / "tiny_clip.safetensors"
    assert main(["convert-clip", str(archive), "--out", str(out), "--preset", "cris_tiny"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["preset"] == "cris_tiny" and summary["tensors"] == len(clip.state_dict())
    expected = clip.state_dict()
    state = read_clip_archive(archive)
    assert set(state) == set(expected)  # no attn_mask, no input_resolution
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    for pretrained in (out, archive):  # the converted file, or the archive itself
        config = get_preset("cris_tiny", pretrained=str(pretrained), random_init=False)
        backbone = build_model(config).backbone.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in backbone.items())
    assert not (Path.cwd() / "pwned").exists()


def test_weights_that_fit_no_named_clip_are_refused(
    archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "clip.safetensors"
    assert main(["convert-clip", str(archive), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(archive) in err and "fit no CLIP of cris_r50" in err and "--preset" in err
    assert list(tmp_path.iterdir()) == []


def _with_data_pkl(archive: Path, dest: Path, data: bytes) -> Path:
    """A copy of `archive` whose data.pkl is `data`."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(dest, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename.endswith("/data.pkl") else src.read(info))
    return dest


def test_archives_that_would_run_code_or_are_cut_are_refused(
    archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    evil = _with_data_pkl(archive, tmp_path / "evil.pt",
                          code_pickle(marker, wrap=[Exploit(marker)]))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(archive.read_bytes()[:100_000])
    for bad, message in ((evil, "cannot be read without running code (refers to "),
                         (cut, "unreadable CLIP archive")):
        assert main(["convert-clip", str(bad), "--out", str(tmp_path / "o.safetensors"),
                     "--preset", "cris_tiny"]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(bad) in err and message in err
        if bad == evil:  # says what it met, and how to convert where the file is trusted
            assert "exec, which is not plain tensor data" in err and "torch.jit.load(" in err
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()
