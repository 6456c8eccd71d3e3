"""CRIS as an MLflow pyfunc model, logged as code (no pickled Python objects).

`cris register` logs this file with `mlflow.pyfunc.log_model(python_model=<this file>,
artifacts={"checkpoint": <checkpoint directory>})`; MLflow runs it when the model is
loaded, and `set_model` below names the model object. The weights travel as the
checkpoint artifact (safetensors + JSON), read by `Predictor.from_checkpoint`.

Serving format (one row per referring expression, rows numbered from 0):
    input   image  string: base64 of an image file (PNG, JPEG, ...); Python callers may
                   also pass the file's raw bytes
            text   string: the referring expression, not empty or only whitespace
    output  mask   string: COCO compressed RLE counts of the HxW mask (pycocotools;
                   decode with `cris_model.data.masks.mask_from_rle(mask, height, width)`)
            height long: mask (= image) height in pixels
            width  long: mask (= image) width in pixels
            area   double: fraction of the image the mask covers, in [0, 1]
Rows that carry the same image share one image encoding. Every row is checked before any is
scored: a bad one fails the whole request with an MlflowException (HTTP 400 from the
scoring server) whose message names the row and the problem, and is logged with it. The
image column is a string, not MLflow's binary type, because MLflow refuses bad base64 in a
binary column for the whole column, before the model could name the row.

Each call keeps its state in local variables (`Predictor.embed` returns the encoded image),
so the scoring server's threads can run requests at the same time.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema
from PIL import Image

from cris_model.data.masks import rle_from_mask
from cris_model.imaging import decode_image
from cris_model.predict import Predictor, check_text

CHECKPOINT_ARTIFACT = "checkpoint"  # artifacts key holding the checkpoint directory
OUTPUT_COLUMNS = ("mask", "height", "width", "area")  # columns of the prediction frame
_log = logging.getLogger(__name__)


def signature() -> ModelSignature:
    """The model signature: (image base64 string, text string) -> (mask RLE, height, width,
    area)."""
    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "text")])
    outputs = Schema([ColSpec("string", "mask"), ColSpec("long", "height"),
                      ColSpec("long", "width"), ColSpec("double", "area")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _refuse(row: int, problem: str) -> MlflowException:
    """The request error for one bad row, logged with its row index."""
    message = f"row {row}: {problem}"
    _log.warning("refused a request: %s", message)
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _text(value: Any, row: int) -> str:
    """The phrase of a row, stripped (`predict.check_text`); refused naming the row."""
    try:
        return check_text(value)
    except ValueError as e:
        raise _refuse(row, str(e)) from e


def _image_bytes(value: Any, row: int) -> bytes:
    """Raw image file bytes from a base64 string cell, or from a bytes cell."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as e:
            raise _refuse(row, f"image is not valid base64 ({e})") from e
    kind = "null" if value is None else type(value).__name__
    raise _refuse(row, f"image must be a base64 string, got {kind}")


def _decoded(column: pd.Series) -> tuple[list[Image.Image], list[int]]:
    """(each distinct image decoded once, the index of each row's image in that list)."""
    first: dict[bytes, int] = {}
    images: list[Image.Image] = []
    owner = []
    for row, value in enumerate(column):
        data = _image_bytes(value, row)
        if data not in first:
            try:
                images.append(decode_image(data, "image"))
            except ValueError as e:
                raise _refuse(row, str(e)) from e
            first[data] = len(images) - 1
        owner.append(first[data])
    return images, owner


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
            raise MlflowException(f"model input lacks column(s): {', '.join(sorted(missing))}",
                                  error_code=INVALID_PARAMETER_VALUE)
        texts = [_text(t, row) for row, t in enumerate(model_input["text"])]
        images, owner = _decoded(model_input["image"])
        rows: list[dict[str, Any]] = [{} for _ in texts]
        for k, image in enumerate(images):
            indices = [i for i, o in enumerate(owner) if o == k]
            embedding = self.predictor.embed(image)
            masks = self.predictor.segment(embedding, [texts[i] for i in indices])
            for i, mask in zip(indices, masks, strict=True):
                rows[i] = {"mask": rle_from_mask(mask), "height": int(mask.shape[0]),
                           "width": int(mask.shape[1]), "area": float(mask.mean())}
        return pd.DataFrame.from_records(rows, columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(CrisPyfunc())
