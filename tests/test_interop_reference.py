"""`cris import reference`: the name table against the real reference's tensors, an import
that reproduces the reference's own logits, and files refused in one line, nothing written.

tests/data/reference_cris.json was written by tests/data/make_reference_fixture.py from the
real CRIS.pytorch code: its RN50 / RN101 tensor names and shapes, and its logits for the
seeded tiny model of tests/reference_support.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from payloads import Exploit, code_pickle
from reference_support import (
    fixture_inputs,
    tiny_model,
    train_py_checkpoint,
    write_reference_files,
)

from cris_model.checkpoint import load_checkpoint, read_checkpoint_meta
from cris_model.cli import main
from cris_model.config import get_preset
from cris_model.interop.reference import ReferenceSettings, infer_config
from cris_model.interop.reference_names import DROPPED, from_reference, to_reference
from cris_model.model import CRIS, build_untrained

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURE = json.loads((Path(__file__).parent / "data" / "reference_cris.json").read_text())


def _pinned(name: str) -> dict[str, torch.Tensor]:
    """The reference's tensors of `name` as meta tensors of the pinned shapes."""
    return {k: torch.empty([int(d) for d in s.split("x") if d], device="meta")
            for k, s in FIXTURE["shapes"][name].items()}


@pytest.mark.parametrize("preset", ["cris_r50", "cris_r101"])
def test_table_maps_every_reference_tensor_both_ways(preset: str) -> None:
    pinned = _pinned(preset)
    with torch.device("meta"):
        ours = build_untrained(get_preset(preset)).state_dict()
    as_reference = to_reference(ours)
    assert set(as_reference) | set(DROPPED) == set(pinned)
    assert {k: v.shape for k, v in as_reference.items()} == {
        k: pinned[k].shape for k in as_reference}
    back, unknown = from_reference(pinned)
    assert unknown == [] and set(back) == set(ours)
    config = infer_config(back, ReferenceSettings(), Path("best_model.pth"))
    assert config == get_preset(preset)  # RN50 / RN101 recognised, reference defaults kept


@pytest.fixture(scope="module")
def tiny() -> CRIS:
    return tiny_model()


@pytest.fixture(scope="module")
def files(tiny: CRIS, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model as a train.py checkpoint, and a reference YAML config for it."""
    return write_reference_files(tmp_path_factory.mktemp("reference"), tiny)


def _import(files: dict[str, Path], out: Path, checkpoint: Path | None = None) -> int:
    return main(["import", "reference", "--checkpoint", str(checkpoint or files["checkpoint"]),
                 "--out", str(out), "--config", str(files["config"])])


def test_import_gives_the_reference_logits(
    tiny: CRIS, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _import(files, tmp_path / "imported") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dropped"] == ["backbone.logit_scale"] and summary["preset"] == "inline"
    model = load_checkpoint(tmp_path / "imported")
    assert (model.config.input_size, model.config.num_heads) == (96, 4)
    with torch.no_grad():
        got, ours = model(*fixture_inputs()), tiny(*fixture_inputs())
    assert torch.equal(got, ours)  # the same function on the same weights, bit for bit
    pinned = FIXTURE["tiny"]
    reference = torch.tensor([[float(v) for v in row.split()] for row in pinned["logits"]])
    reference = reference.reshape(pinned["shape"])
    # float32 rounding in other op orders (2.6e-5 here, logits up to 10): not a mapping error
    assert (got - reference).abs().max().item() < 2e-4, "differs from CRIS.pytorch's logits"
    meta = read_checkpoint_meta(tmp_path / "imported")
    source = meta["extra"]["source"]
    assert (source["epoch"], source["best_iou"], source["prec"]["Pr@50"]) == (50, 0.7034, 0.81)
    assert len(source["sha256"]) == 64 and source["clip_pretrain"] == "pretrain/tiny.pt"
    assert meta["metrics"] == {}  # registration waits for our own evaluation


def _refused(files: dict[str, Path], bad: Path, tmp_path: Path,
             capsys: pytest.CaptureFixture[str]) -> str:
    """Import `bad`; assert exit 1, one stderr line naming it, nothing written; -> that line."""
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    assert _import(files, out, bad) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err, err
    assert not out.exists() and set(tmp_path.iterdir()) == before
    return err


def _edited(files: dict[str, Path], tmp_path: Path, name: str, edit: str) -> Path:
    """The test checkpoint with one weight dropped, added or reshaped."""
    saved = torch.load(files["checkpoint"], weights_only=True)
    weights = saved["state_dict"]
    if edit == "missing":
        del weights["module.neck.aggr.1.running_mean"]
    elif edit == "extra":
        weights["module.neck.bogus.weight"] = torch.zeros(2)
    else:
        weights["module.neck.aggr.0.weight"] = torch.zeros(128, 64, 1, 1)
    torch.save(saved, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(("edit", "message"), [
    ("missing", "missing 1 tensor(s): neck.aggr.1.running_mean"),
    ("extra", "1 unexpected tensor(s): neck.bogus.weight"),
    ("shape", "tensor neck.aggr.0.weight has shape [128, 64, 1, 1], expected [128, 384, 1, 1]"),
])
def test_missing_extra_and_misshapen_tensors_are_refused(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: str,
    message: str,
) -> None:
    bad = _edited(files, tmp_path, f"{edit}.pth", edit)
    assert message in _refused(files, bad, tmp_path, capsys)


def test_truncated_and_foreign_files_are_refused(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = files["checkpoint"].read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated" in _refused(files, cut, tmp_path, capsys)
    other = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.ones(2)}}, other)
    assert "no 'state_dict' (found model)" in _refused(files, other, tmp_path, capsys)
    scripted = tmp_path / "RN50.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    assert "TorchScript archive" in _refused(files, scripted, tmp_path, capsys)
    half = train_py_checkpoint({"backbone.ln_final.weight": torch.ones(2)})
    half["state_dict"]["neck.aggr.0.weight"] = torch.ones(2)  # one key without "module."
    mixed = tmp_path / "mixed.pth"
    torch.save(half, mixed)
    assert "some state_dict keys carry" in _refused(files, mixed, tmp_path, capsys)


def test_a_pickle_that_would_run_code_is_refused_unrun(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    plain = tmp_path / "plain.pth"
    plain.write_bytes(code_pickle(marker))
    zipped = tmp_path / "zipped.pth"
    torch.save({"epoch": 1, "state_dict": {"module.x": Exploit(marker)}}, zipped)
    for bad in (zipped, plain):
        assert "refused" in _refused(files, bad, tmp_path, capsys)
    assert not marker.exists()


def test_a_reference_config_that_contradicts_the_tensors_is_refused(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cris_r50.yaml"
    config.write_text(files["config"].read_text().replace("vis_dim: 128", "vis_dim: 512"))
    out = tmp_path / "out"
    assert main(["import", "reference", "--checkpoint", str(files["checkpoint"]), "--out",
                 str(out), "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}: TRAIN.vis_dim 512 disagrees with the checkpoint's tensors (128)" in err
    assert not out.exists()
