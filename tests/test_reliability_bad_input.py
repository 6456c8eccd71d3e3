"""Bad input: generated files and phrases through the readers and `cris predict`.

Every case either works or fails with one clear line (`cris: error: ...` from the CLI, a
ValueError / FileNotFoundError naming the file from a reader); nothing crashes with another
exception, hangs (each example has a deadline) or writes a partial output. The model is
cris_tiny with random weights: what is checked is the input handling, not the masks.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from cris_model.checkpoint import read_checkpoint_meta, save_checkpoint
from cris_model.cli import main
from cris_model.config import get_preset
from cris_model.data.fetch_checksums import parse_manifest
from cris_model.data.manifest import read_manifest
from cris_model.data.masks import mask_from_rle
from cris_model.data.refer import load_plain_pickle, read_instances, read_refs
from cris_model.model import build_model
from cris_model.predict import load_image

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = settings(max_examples=30, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
READER_ERRORS = (ValueError, FileNotFoundError)
FORMATS = {"PNG": ("RGB", "L", "LA", "RGBA", "P", "1", "I;16"), "JPEG": ("RGB", "L", "CMYK"),
           "GIF": ("P", "L"), "TIFF": ("RGB", "L", "RGBA", "CMYK", "I;16", "I", "F", "1"),
           "WEBP": ("RGB", "RGBA"), "BMP": ("RGB", "L", "P", "1")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model(get_preset("cris_tiny", random_init=True)).eval()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best", model)


def _encode(mode: str, fmt: str, width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode in ("I", "F"):
        image = rgb.convert("L").convert(mode)
    else:
        image = rgb.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    """An encoded image of a random format, mode and size (1 px to very thin), possibly with
    flipped bytes or cut short, or plain random bytes."""
    kind = draw(st.sampled_from(["image", "image", "damaged", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=3000))
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    side = st.one_of(st.integers(1, 48), st.sampled_from([1, 2, 600]))
    data = _encode(mode, fmt, draw(side), draw(side), draw(st.integers(0, 9)))
    if kind == "image":
        return data
    damaged = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        damaged[draw(st.integers(0, len(damaged) - 1))] = draw(st.integers(0, 255))
    return bytes(damaged[: draw(st.integers(1, len(damaged)))])


PHRASES = st.one_of(
    st.text(min_size=1, max_size=40),  # any unicode, whitespace-only included
    st.text(alphabet=st.characters(codec="utf-8"), min_size=2000, max_size=6000),
    st.sampled_from(["", "   ", "\t\n", "\u200b", "\x00", "the red square \U0001f7e5 左边",
                     "\u202eright\u202c", "a" * 100_000]),
)


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


def _assert_one_line_error(rc: int, err: str) -> None:
    assert rc == 1
    assert err.startswith("cris: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


@settings(FAST, max_examples=40)
@given(data=image_bytes(), texts=st.lists(PHRASES, min_size=1, max_size=3))
def test_predict_cli_works_or_fails_in_one_line(checkpoint: Path, data: bytes,
                                                 texts: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        image, out = Path(tmp) / "input.img", Path(tmp) / "mask.png"
        image.write_bytes(data)
        args = ["predict", "--checkpoint", str(checkpoint), "--image", str(image),
                "--out", str(out)]
        for text in texts:
            args.append(f"--text={text}")  # the form that passes a phrase starting with "-"
        rc, stdout, err = _cli(args)
        event("works" if rc == 0 else "refused")
        written = sorted(p.name for p in Path(tmp).iterdir() if p.name != "input.img")
        if rc != 0:
            _assert_one_line_error(rc, err)
            assert written == []
            return
        size = load_image(image).size
        summary = json.loads(stdout)
        assert len(summary) == len(texts) == len(written)
        for entry in summary:
            mask = Image.open(entry["mask"])
            assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels but holds one tiny compressed row."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width,height", [(10_000, 9_500), (100_000, 100_000), (2**31 - 1, 2)])
def test_decompression_bombs_are_refused_before_decoding(
    checkpoint: Path, tmp_path: Path, width: int, height: int
) -> None:
    """Above PIL's MAX_IMAGE_PIXELS (89 M px; the first case is only 1.06x it, where PIL
    alone merely warns) the header is enough to refuse: no pixel memory, no wait."""
    image = tmp_path / "bomb.png"
    image.write_bytes(_png_header(width, height))
    start = time.monotonic()
    rc, _, err = _cli(["predict", "--checkpoint", str(checkpoint), "--image", str(image),
                       "--text", "anything", "--out", str(tmp_path / "mask.png")])
    _assert_one_line_error(rc, err)
    assert "bomb.png" in err and "decompression bomb" in err
    assert time.monotonic() - start < 5 and not (tmp_path / "mask.png").exists()


# ---- readers ------------------------------------------------------------------------------


def _reads_or_refuses(read: Any, path: Path) -> None:
    try:
        read(path)
    except READER_ERRORS as e:
        assert str(path) in str(e) and "\n" not in str(e).strip()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["ref_id", "image_id", "ann_id", "split", "sent_ids", "sentences",
                         "sent_id", "sent", "category_id", "id", "file_name", "height",
                         "width", "images", "annotations", "categories", "bbox", "name",
                         "segmentation", "iscrowd", "x"]), inner, max_size=6),
    max_leaves=30,
)


@FAST
@given(value=JSON, raw=st.binary(max_size=400))
def test_refer_readers_accept_or_refuse_any_structure(value: Any, raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = {"refs(unc).p": pickle.dumps(value, protocol=2), "grefs(unc).json":
                 json.dumps(value).encode(), "instances.json": json.dumps(value).encode(),
                 "raw.p": raw, "raw.json": raw}
        for name, data in files.items():
            (root / name).write_bytes(data)
        for name in ("refs(unc).p", "raw.p"):
            _reads_or_refuses(lambda p: read_refs(p, "refcoco", "unc"), root / name)
        for name in ("grefs(unc).json", "raw.json"):
            _reads_or_refuses(lambda p: read_refs(p, "grefcoco", "unc"), root / name)
        for name in ("instances.json", "raw.json"):
            _reads_or_refuses(read_instances, root / name)


@FAST
@given(raw=st.binary(max_size=600), text=st.text(max_size=200))
def test_manifests_masks_and_checkpoint_metadata_accept_or_refuse_any_bytes(
    raw: bytes, text: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "val.parquet").write_bytes(raw)
        _reads_or_refuses(read_manifest, root / "val.parquet")
        for name in ("config.json", "tokenizer.json", "metrics.json", "extra.json"):
            (root / name).write_bytes(raw if name == "config.json" else b"{}")
        with contextlib.suppress(*READER_ERRORS):
            read_checkpoint_meta(root)
    with contextlib.suppress(ValueError):
        parse_manifest(text, "SHA256SUMS")
    with contextlib.suppress(ValueError):
        mask = mask_from_rle(text, 7, 5)
        assert mask.shape == (7, 5) and mask.dtype == bool


def test_a_pickle_of_shared_references_is_checked_in_linear_time(tmp_path: Path) -> None:
    """A few hundred bytes that would be 2**64 nodes as a tree ("billion laughs")."""
    value: list[Any] = ["x"]
    for _ in range(64):
        value = [value, value]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(value, protocol=2))
    start = time.monotonic()
    loaded = load_plain_pickle(path)
    assert loaded[0] is loaded[1]  # shared, as pickled (comparing with == would never end)
    with pytest.raises(ValueError, match="is a list, expected a dict"):
        read_refs(path, "refcoco", "unc")
    assert time.monotonic() - start < 2


def test_a_pickle_that_contains_itself_is_refused_not_looped(tmp_path: Path) -> None:
    ref: dict[str, Any] = {"ref_id": 1}
    ref["sentences"] = [ref]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([ref], protocol=2))
    with pytest.raises(ValueError, match="refs"):
        read_refs(path, "refcoco", "unc")


@pytest.mark.parametrize("name", ["grefs(unc).json", "instances.json"])
def test_json_nested_too_deep_is_a_clear_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("[" * 200_000 + "]" * 200_000)
    read = read_instances if name == "instances.json" else (
        lambda p: read_refs(p, "grefcoco", "unc"))
    with pytest.raises(ValueError, match="not valid JSON"):
        read(path)
