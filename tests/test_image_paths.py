"""One file, one input tensor: every path into the model decodes images the same way.

The same RGBA PNG, 16-bit PNG, CMYK JPEG, palette GIF and EXIF-rotated JPEG go through the
training dataset, evaluation, the feature cache, `Predictor` and the MLflow pyfunc; the
CLIP-normalised tensor that reaches `encode_image` is the same everywhere.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cris_model.config import get_preset
from cris_model.data.dataset import RefDataset, open_split, read_image
from cris_model.data.manifest import MANIFEST_SCHEMA
from cris_model.data.masks import rle_from_mask
from cris_model.evaluate import predict_split
from cris_model.features import build_feature_cache
from cris_model.imaging import ORIENTATION_TAG, load_image, normalize
from cris_model.mlflow_model import CrisPyfunc
from cris_model.model import CRIS, build_model
from cris_model.predict import Predictor
from data_checks import validate_prepared

H, W = 24, 36  # stored size of every test image
SIZE = 64  # model input side


def _rgba(path: Path) -> None:
    """Left half opaque orange, right half transparent over a hidden black."""
    arr = np.zeros((H, W, 4), np.uint8)
    arr[:, : W // 2] = (230, 120, 20, 255)
    arr[:, W // 2 : W // 2 + 3, :3] = (10, 200, 10)
    arr[:, W // 2 : W // 2 + 3, 3] = 128  # a half-transparent band
    Image.fromarray(arr).save(path)


def _grey16(path: Path) -> None:
    """16-bit grey ramp holding the value 40000 at the top left."""
    ramp = np.linspace(0, 65535, H * W).reshape(H, W).astype(np.uint16)
    ramp[0, 0] = 40000
    Image.fromarray(ramp).save(path)


def _cmyk(path: Path) -> None:
    arr = np.zeros((H, W, 4), np.uint8)
    arr[:, : W // 2] = (0, 255, 255, 0)
    arr[:, W // 2 :] = (255, 0, 0, 60)
    Image.fromarray(arr, "CMYK").save(path, quality=95)


def _palette(path: Path) -> None:
    """Palette GIF: index 0 transparent (hidden colour black), 1 red, 2 blue."""
    idx = np.ones((H, W), np.uint8)
    idx[:, W // 2 :] = 2
    idx[: H // 3] = 0
    img = Image.fromarray(idx, "P")
    img.putpalette([0, 0, 0, 220, 30, 30, 30, 30, 220] + [0] * (256 * 3 - 9))
    img.save(path, transparency=0)


def _rotated(path: Path, blue: int = 240) -> None:
    """Stored W wide and H high with EXIF orientation 6: a viewer turns it 90 degrees
    clockwise, so the red band stored on the left shows on top."""
    arr = np.zeros((H, W, 3), np.uint8)
    arr[:, : W // 3] = (240, 40, 40)
    arr[: H // 2, W // 3 :] = (40, 40, blue)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    Image.fromarray(arr).save(path, quality=95, exif=exif)


def _coco_rotated(path: Path) -> None:
    """Like `_rotated`, with other pixels (so it is another file)."""
    _rotated(path, blue=200)


# file -> (writer, (height, width) the manifest records)
IMAGES: dict[str, tuple[Callable[[Path], None], tuple[int, int]]] = {
    "rgba.png": (_rgba, (H, W)),
    "grey16.png": (_grey16, (H, W)),
    "cmyk.jpg": (_cmyk, (H, W)),
    "palette.gif": (_palette, (H, W)),
    "rotated.jpg": (_rotated, (W, H)),  # annotated upright (as EXIF-aware tools do)
    "coco_rotated.jpg": (_coco_rotated, (H, W)),  # annotated on the pixels as stored (COCO)
}
SAME_EVERYWHERE = [name for name in IMAGES if name != "coco_rotated.jpg"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder with split `val`: one sentence per image above."""
    root = tmp_path_factory.mktemp("modes")
    images, out = root / "images", root / "prepared"
    images.mkdir()
    out.mkdir()
    rows = []
    for i, (name, (write, (h, w))) in enumerate(IMAGES.items(), start=1):
        write(images / name)
        mask = np.zeros((h, w), bool)
        mask[2:10, 3:12] = True
        rows.append({
            "dataset": "refcoco", "split": "val", "ref_id": i, "sent_id": i, "image_id": i,
            "file_name": name, "height": h, "width": w, "sentence": "the left thing",
            "raw": "the left thing", "tokens": ["the", "left", "thing"], "ann_ids": [i],
            "category_id": 1, "mask_rle": rle_from_mask(mask), "bbox": [3.0, 2.0, 9.0, 8.0],
            "no_target": False,
        })
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out / "val.parquet")
    summary = {"dataset": "refcoco", "split_by": "unc", "image_dir": str(images.resolve())}
    (out / "summary.json").write_text(json.dumps(summary))
    return out


@pytest.fixture(scope="module")
def model() -> CRIS:
    torch.manual_seed(0)
    return build_model(get_preset("cris_tiny", random_init=True, input_size=SIZE)).eval()


class _Seen:
    """Records every image batch `encode_image` receives, one 3xSxS tensor per image."""

    def __init__(self, model: CRIS) -> None:
        self.model, self.images = model, []
        self.encode = model.encode_image

    def __enter__(self) -> list[torch.Tensor]:
        def encode_image(image: torch.Tensor) -> dict[str, torch.Tensor]:
            self.images += [x.detach().clone() for x in image]
            return self.encode(image)

        self.model.encode_image = encode_image  # type: ignore[method-assign]
        return self.images

    def __exit__(self, *exc: object) -> None:
        del self.model.encode_image


def _every_path(model: CRIS, data: Path, tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """path -> file name -> the normalised 3xSxS tensor that path feeds the model."""
    rows, image_dir = open_split(data, "val")
    names = list(rows["file_name"])
    dataset = RefDataset(data, "val", SIZE, model.config.word_len, sample="sentence")
    seen: dict[str, dict[str, torch.Tensor]] = {
        "training dataset": {n: normalize(dataset[i]["image"]) for i, n in enumerate(names)}}
    with _Seen(model) as images:
        list(predict_split(model, rows, image_dir, batch_size=len(rows)))
    seen["evaluation"] = dict(zip(names, images, strict=True))
    with _Seen(model) as images:
        build_feature_cache(model, data, "val", tmp_path / "features", batch_size=2)
    seen["feature cache"] = dict(zip(names, images, strict=True))
    predictor = Predictor(model)
    with _Seen(model) as images:
        for name in names:
            predictor.embed(load_image(image_dir / name))
            with Image.open(image_dir / name) as opened:
                predictor.embed(opened)
    seen["Predictor(load_image)"] = dict(zip(names, images[0::2], strict=True))
    seen["Predictor(Image.open)"] = dict(zip(names, images[1::2], strict=True))
    pyfunc = CrisPyfunc()
    pyfunc.predictor = predictor
    cells = [base64.b64encode((image_dir / n).read_bytes()).decode("ascii") for n in names]
    with _Seen(model) as images:
        pyfunc.predict(None, pd.DataFrame({"image": cells, "text": ["the thing"] * len(names)}))
    seen["pyfunc"] = dict(zip(names, images, strict=True))
    return seen


def test_every_path_feeds_the_model_the_same_tensor(model: CRIS, data: Path,
                                                    tmp_path: Path) -> None:
    seen = _every_path(model, data, tmp_path)
    reference = seen["training dataset"]
    for path, tensors in seen.items():
        for name in SAME_EVERYWHERE:
            assert tensors[name].shape == (3, SIZE, SIZE), (path, name)
            assert torch.equal(tensors[name], reference[name]), (path, name)


def test_the_mode_policy(data: Path) -> None:
    rows, image_dir = open_split(data, "val")
    read = {str(r["file_name"]): np.asarray(read_image(image_dir, r)) for _, r in rows.iterrows()}
    assert read["rgba.png"][0, -1].tolist() == [255, 255, 255]  # transparent: white, not black
    assert read["rgba.png"][0, 0].tolist() == [230, 120, 20]
    assert read["rgba.png"][0, W // 2].tolist() == [132, 227, 132]  # half-transparent green
    assert read["grey16.png"][0, 0].tolist() == [156, 156, 156]  # 40000 >> 8, not clipped
    assert read["palette.gif"][0, 0].tolist() == [255, 255, 255]
    assert read["palette.gif"][-1, 0].tolist() == [220, 30, 30]
    r, g, b = read["cmyk.jpg"][5, 5].tolist()
    assert r > 200 and g < 60 and b < 60
    assert read["rotated.jpg"].shape == (W, H, 3)  # upright: the manifest's size
    assert read["rotated.jpg"][0, -1].tolist()[0] > 200  # the red band is now on top
    assert read["coco_rotated.jpg"].shape == (H, W, 3)  # as stored: COCO's frame
    assert load_image(image_dir / "coco_rotated.jpg").size == (H, W)  # a viewer: upright


def test_validate_reports_conversions_and_orientations(data: Path) -> None:
    report = validate_prepared(data)
    assert report.check("image_size_matches").status == "passed"
    converted = report.info["images_converted"]
    assert converted["files"] == 4
    assert set(converted["examples"]) == {"rgba.png", "grey16.png", "cmyk.jpg", "palette.gif"}
    assert "I;16: 16-bit grey scaled to 8 bits" in converted["by_conversion"]
    oriented = report.info["images_exif_oriented"]
    assert (oriented["files"], oriented["read_upright"], oriented["read_as_stored"]) == (2, 1, 1)
    assert oriented["upright_size_differs_from_manifest"]["examples"] == ["coco_rotated.jpg"]
    assert "images_exif_oriented" in report.render()
