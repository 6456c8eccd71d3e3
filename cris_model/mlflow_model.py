"""CRIS as an MLflow pyfunc model, logged as code (no pickled Python objects).

`cris register` logs this file with `mlflow.pyfunc.log_model(python_model=<this file>,
artifacts={"checkpoint": <checkpoint directory>})`; MLflow runs it when the model is
loaded, and `set_model` below names the model object. The weights travel as the
checkpoint artifact (safetensors + JSON), read by `Predictor.from_checkpoint`.

Serving format (one row per referring expression):
    input   image  binary: PNG/JPEG file bytes (JSON clients send them base64-encoded)
            text   string: the referring expression
    output  mask   string: COCO compressed RLE counts of the HxW mask (pycocotools;
                   decode with `cris_model.data.masks.mask_from_rle(mask, height, width)`)
            height long: mask (= image) height in pixels
            width  long: mask (= image) width in pixels
            area   double: fraction of the image the mask covers, in [0, 1]
Rows that carry the same image bytes share one image encoding.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema

from cris_model.data.masks import rle_from_mask
from cris_model.predict import Predictor, load_image

CHECKPOINT_ARTIFACT = "checkpoint"  # artifacts key holding the checkpoint directory
OUTPUT_COLUMNS = ("mask", "height", "width", "area")  # columns of the prediction frame


def signature() -> ModelSignature:
    """The model signature: (image binary, text string) -> (mask RLE, height, width, area)."""
    inputs = Schema([ColSpec("binary", "image"), ColSpec("string", "text")])
    outputs = Schema([ColSpec("string", "mask"), ColSpec("long", "height"),
                      ColSpec("long", "width"), ColSpec("double", "area")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _image_bytes(value: Any, row: int) -> bytes:
    """Raw image file bytes from a binary cell, or from a base64 string cell."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as e:
            raise ValueError(f"row {row}: image is neither bytes nor valid base64") from e
    raise ValueError(f"row {row}: image must be bytes or a base64 string, got {type(value)}")


def _decode(data: bytes) -> Any:
    """Image file bytes -> RGB PIL image, decoded exactly as `cris predict` decodes a file."""
    fd, name = tempfile.mkstemp(prefix="cris-image-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_image(name)
    finally:
        os.unlink(name)


class CrisPyfunc(PythonModel):
    """Loads the checkpoint artifact once; answers (image, text) rows with RLE masks."""

    def load_context(self, context: PythonModelContext) -> None:
        """Build the predictor from the logged checkpoint directory (CPU, its threshold)."""
        self.predictor = Predictor.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """DataFrame with `image` and `text` columns -> DataFrame of `OUTPUT_COLUMNS`."""
        missing = {"image", "text"} - set(model_input.columns)
        if missing:
            raise ValueError(f"model input lacks column(s): {', '.join(sorted(missing))}")
        groups: dict[bytes, list[int]] = {}
        for i, value in enumerate(model_input["image"]):
            groups.setdefault(_image_bytes(value, i), []).append(i)
        texts = [str(t) for t in model_input["text"]]
        rows: list[dict[str, Any]] = [{} for _ in texts]
        for data, indices in groups.items():
            self.predictor.set_image(_decode(data))
            masks = self.predictor.predict([texts[i] for i in indices])
            for i, mask in zip(indices, masks, strict=True):
                rows[i] = {"mask": rle_from_mask(mask), "height": int(mask.shape[0]),
                           "width": int(mask.shape[1]), "area": float(mask.mean())}
        self.predictor.reset_image()
        return pd.DataFrame.from_records(rows, columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(CrisPyfunc())
