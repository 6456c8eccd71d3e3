"""`cris export --format onnx`: graphs that onnxruntime runs like PyTorch at batch 1 and 3,
the split encoder/head pair, refusal above tolerance, and the ONNX file a registered version
carries when `registry.export_onnx` is on (here for a model imported from CRIS.pytorch, which
`cris predict` and `cris evaluate` take like any checkpoint on the way).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient
from reference_support import tiny_model, write_reference_files
from tiny_refer import make_prepared

from cris_model.backbone import tokenize
from cris_model.checkpoint import load_checkpoint, save_checkpoint
from cris_model.cli import main
from cris_model.config import get_preset
from cris_model.interop.onnx_export import export_model, export_split, split_paths
from cris_model.model import CRIS, build_model

pytestmark = pytest.mark.usefixtures("one_thread")
PHRASES = ["the red square", "the blue one on the right", "left"]


@pytest.fixture(scope="module")
def model() -> CRIS:
    torch.manual_seed(0)
    return build_model(get_preset("cris_tiny", random_init=True)).eval()


def _inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.randn(batch, 3, 128, 128, generator=torch.Generator().manual_seed(seed))
    return image, tokenize(PHRASES[:batch], 17)


def _worst(session: onnxruntime.InferenceSession, model: CRIS, batch: int) -> float:
    image, tokens = _inputs(batch, seed=10 + batch)
    got = session.run(["logits"], {"image": image.numpy(), "tokens": tokens.numpy()})[0]
    with torch.no_grad():
        want = model(image, tokens).numpy()
    assert got.shape == want.shape == (batch, 1, 32, 32)
    return float(np.abs(got - want).max())


def test_cli_export_runs_in_onnxruntime_like_pytorch_at_batch_1_and_3(
    model: CRIS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = save_checkpoint(tmp_path / "best", model)
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out",
                 str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["max_abs_diff"]) == set(summary["max_abs_logit"]) == {"1", "3"}
    assert max(summary["max_abs_diff"].values()) < 1e-4
    graph = onnx.load(str(out)).graph
    onnx.checker.check_model(str(out))

    def dims(values: list) -> dict[str, list]:
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in values}

    assert dims(graph.input) == {"image": ["batch", 3, 128, 128], "tokens": ["batch", 17]}
    assert dims(graph.output) == {"logits": ["batch", 1, 32, 32]}
    assert graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert max(_worst(session, model, 1), _worst(session, model, 3)) < 1e-4


def test_split_export_encodes_the_image_once_for_many_phrases(
    model: CRIS, tmp_path: Path
) -> None:
    summary = export_split(model, tmp_path / "cris.onnx")
    encoder_path, head_path = split_paths(tmp_path / "cris.onnx")
    assert summary["files"] == [str(encoder_path), str(head_path)]
    encoder = onnxruntime.InferenceSession(str(encoder_path), providers=["CPUExecutionProvider"])
    head = onnxruntime.InferenceSession(str(head_path), providers=["CPUExecutionProvider"])
    image, _ = _inputs(1, seed=5)
    maps = dict(zip(model.image_keys, encoder.run(None, {"image": image.numpy()}), strict=True))
    for count in (1, 3):
        tokens = tokenize(PHRASES[:count], 17)
        got = head.run(None, {**maps, "tokens": tokens.numpy()})[0]
        with torch.no_grad():
            want = model(image.expand(count, -1, -1, -1), tokens).numpy()
        assert got.shape == want.shape and float(np.abs(got - want).max()) < 1e-4


def test_a_vit_backbone_exports_too(tmp_path: Path) -> None:
    """open_clip's ViT blocks take MultiheadAttention's fused kernel, which ONNX lacks."""
    clip = {"embed_dim": 64, "quick_gelu": True,
            "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 16,
                           "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                         "layers": 1}}
    config = get_preset("cris_vit_b16", clip_model="", clip_config=clip, pretrained="",
                        random_init=True, input_size=64, fpn_in=[64, 128, 64],
                        fpn_out=[32, 64, 64], vis_dim=64, num_layers=1, num_heads=2,
                        dim_ffn=64, vit_layers=[1, 2, 3])
    torch.manual_seed(0)
    summary = export_model(build_model(config).eval(), tmp_path / "vit.onnx")
    assert max(summary["max_abs_diff"].values()) < 1e-4
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on after the export


def test_export_beyond_tolerance_fails_and_writes_nothing(model: CRIS, tmp_path: Path) -> None:
    refusal = r"differs from PyTorch by .* at batch 1 \(tolerance 1e-12 x max\(1, largest"
    with pytest.raises(RuntimeError, match=refusal):
        export_model(model, tmp_path / "model.onnx", check_batches=(1,), tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_imported_reference_model_registers_with_its_onnx(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = write_reference_files(tmp_path, tiny_model())
    ckpt, evaluation = tmp_path / "imported", tmp_path / "eval"
    assert main(["import", "reference", "--checkpoint", str(files["checkpoint"]), "--out",
                 str(ckpt), "--config", str(files["config"])]) == 0
    data = make_prepared(tmp_path, {"val": 2})
    assert main(["predict", "--checkpoint", str(ckpt), "--image",
                 str(tmp_path / "images" / "img_00001.png"), "--text", "the red square",
                 "--out", str(tmp_path / "mask.png")]) == 0
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--split", "val",
                 "--out", str(evaluation), "--gallery-size", "0"]) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    capsys.readouterr()
    assert main(["register", "--checkpoint", str(ckpt), "--metrics",
                 str(evaluation / "metrics.json"), "--tracking-uri", uri,
                 "--set", "registry.model_name=imported", "--set",
                 "registry.export_onnx=true"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["onnx"] == f"runs:/{result['run_id']}/onnx/model.onnx"
    version = MlflowClient(uri, uri).get_model_version("imported", str(result["version"]))
    assert version.run_id == result["run_id"]
    local = download_artifacts(artifact_uri=result["onnx"], dst_path=str(tmp_path / "dl"),
                               tracking_uri=uri)
    session = onnxruntime.InferenceSession(local, providers=["CPUExecutionProvider"])
    imported = load_checkpoint(ckpt)
    image = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    tokens = tokenize(PHRASES[:2], 17)
    with torch.no_grad():
        want = imported(image, tokens).numpy()
    got = session.run(None, {"image": image.numpy(), "tokens": tokens.numpy()})[0]
    assert float(np.abs(got - want).max()) < 1e-4
