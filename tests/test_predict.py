"""Predictor, image loading and `cris predict` on the tiny preset (random init, CPU)."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cris_model.backbone import tokenize
from cris_model.checkpoint import save_checkpoint
from cris_model.cli import main
from cris_model.config import get_preset
from cris_model.gallery import overlay_mask, save_png
from cris_model.imaging import letterbox_image, normalize, undo_letterbox
from cris_model.model import CRIS, build_model
from cris_model.predict import Predictor, check_texts, load_image

W, H = 150, 97  # a non-square test image, wider than tall


def _image(w: int = W, h: int = H, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    arr[h // 4 : h // 2, w // 3 : w // 2] = (220, 30, 30)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def model() -> CRIS:
    torch.manual_seed(0)
    return build_model(get_preset("cris_tiny", random_init=True)).eval()


@pytest.fixture(scope="module")
def checkpoint(model: CRIS, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "best"
    save_checkpoint(path, model, metrics={"mIoU": 0.0})
    return path


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "scene.jpg"
    _image().save(path, quality=95)
    return path


def _median_threshold(prob: np.ndarray) -> float:
    """A threshold that splits a random-init probability map into two non-empty parts."""
    return float(np.clip(np.median(prob), 1e-6, 1 - 1e-6))


# ---- load_image ---------------------------------------------------------------------------


def test_load_image_converts_grayscale_rgba_and_cmyk(tmp_path: Path) -> None:
    gray = tmp_path / "g.png"
    Image.new("L", (7, 5), 90).save(gray)
    rgba = tmp_path / "a.png"
    arr = np.zeros((5, 7, 4), np.uint8)
    arr[..., 0] = 200
    arr[:, :3, 3] = 255  # left three columns opaque red, the rest fully transparent
    Image.fromarray(arr).save(rgba)
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (7, 5), (0, 255, 255, 0)).save(cmyk)
    for path in (gray, rgba, cmyk):
        img = load_image(path)
        assert img.mode == "RGB" and img.size == (7, 5), path
    assert np.asarray(load_image(gray))[0, 0].tolist() == [90, 90, 90]
    out = np.asarray(load_image(rgba))
    assert out[0, 0].tolist() == [200, 0, 0] and out[0, 6].tolist() == [255, 255, 255]
    r, g, b = np.asarray(load_image(cmyk))[2, 3].tolist()
    assert r > 200 and g < 60 and b < 60


def test_load_image_scales_16_bit_grayscale(tmp_path: Path) -> None:
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((5, 7), 200 * 257, np.uint16)).save(path)
    assert np.asarray(load_image(path))[4, 6].tolist() == [200, 200, 200]


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.new("RGB", (30, 20), (10, 200, 10)).save(path, exif=exif)
    assert load_image(path).size == (20, 30)


@pytest.mark.parametrize("payload", [b"not an image at all", b"\x89PNG\r\n\x1a\nbroken"])
def test_load_image_rejects_corrupt_files(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="bad.png"):
        load_image(path)


def test_load_image_rejects_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _image().save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="cut.jpg"):
        load_image(path)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")


@pytest.mark.parametrize("texts", ["", "   ", [], ["the cat", " \t"]])
def test_empty_texts_are_rejected(texts: str | list[str]) -> None:
    with pytest.raises(ValueError):
        check_texts(texts)


# ---- Predictor ----------------------------------------------------------------------------


def test_masks_have_the_original_size_and_follow_the_threshold(model: CRIS) -> None:
    predictor = Predictor(model)
    assert predictor.threshold == model.config.threshold
    predictor.set_image(_image())
    assert predictor.image_size == (H, W)
    (prob,) = predictor.predict_probs("the red square")
    assert prob.shape == (H, W) and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    t = _median_threshold(prob)
    picky = Predictor(model, threshold=t)
    picky.set_image(_image())
    (mask,) = picky.predict("the red square")
    assert mask.dtype == np.bool_ and mask.shape == (H, W)
    np.testing.assert_array_equal(mask, prob > t)
    assert 0 < mask.sum() < mask.size


def test_image_is_encoded_once_for_many_calls(model: CRIS, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = model.encode_image

    def counting(x: torch.Tensor) -> dict:
        calls.append(tuple(x.shape))
        return original(x)

    monkeypatch.setattr(model, "encode_image", counting)
    predictor = Predictor(model)
    predictor.set_image(np.asarray(_image()))
    predictor.predict("left object")
    predictor.predict(["right object", "the big one"])
    size = model.config.input_size
    assert calls == [(1, 3, size, size)]


def test_batch_of_expressions_equals_one_at_a_time(model: CRIS) -> None:
    texts = ["the red square", "blue circle on the left", "nothing"]
    predictor = Predictor(model)
    predictor.set_image(_image())
    batched = predictor.predict_probs(texts)
    single = [predictor.predict_probs(t)[0] for t in texts]
    for b, s in zip(batched, single, strict=True):
        np.testing.assert_allclose(b, s, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 0, "the text must change the prediction"
    t = _median_threshold(single[0])
    picky = Predictor(model, threshold=t)
    picky.set_image(_image())
    for b, s in zip(picky.predict(texts), [picky.predict(x)[0] for x in texts], strict=True):
        np.testing.assert_array_equal(b, s)


def test_cached_path_equals_the_plain_forward(model: CRIS) -> None:
    texts = ["the red square", "the top left corner"]
    canvas, box = letterbox_image(_image(), model.config.input_size)
    x = normalize(torch.tensor(canvas).permute(2, 0, 1)[None]).expand(len(texts), -1, -1, -1)
    with torch.no_grad():
        logits = model(x, tokenize(texts, model.config.word_len))
    expected = [undo_letterbox(torch.sigmoid(lg[0]), box).numpy() for lg in logits]
    predictor = Predictor(model)
    predictor.set_image(_image())
    for got, want in zip(predictor.predict_probs(texts), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_checkpoint_round_trip_gives_the_same_predictions(model: CRIS, checkpoint: Path) -> None:
    texts = ["the red square", "the top left corner"]
    live = Predictor(model)
    live.set_image(_image())
    loaded = Predictor.from_checkpoint(checkpoint)
    loaded.set_image(_image())
    for a, b in zip(live.predict_probs(texts), loaded.predict_probs(texts), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert loaded.threshold == live.threshold


def test_one_predictor_serves_many_threads_at_once(model: CRIS) -> None:
    """Embeddings are values: threads embedding and segmenting different images through one
    Predictor at the same time each get exactly what they get alone."""
    predictor = Predictor(model)
    jobs = [(_image(w, h, seed), text) for seed, (w, h, text) in enumerate(
        [(150, 97, "the red square"), (97, 150, "the circle on the left"),
         (120, 120, "the star"), (64, 41, "object above the blue one")])]
    alone = [predictor.segment_probs(predictor.embed(image), text)[0] for image, text in jobs]
    start = threading.Barrier(len(jobs) * 2)

    def run(k: int) -> list[np.ndarray]:
        image, text = jobs[k % len(jobs)]
        start.wait()
        embedding = predictor.embed(image)
        return [predictor.segment_probs(embedding, text)[0] for _ in range(3)]

    with ThreadPoolExecutor(len(jobs) * 2) as pool:
        results = list(pool.map(run, range(len(jobs) * 2)))
    for k, maps in enumerate(results):
        for got in maps:
            np.testing.assert_array_equal(got, alone[k % len(jobs)])
    first = predictor.embed(jobs[0][0])
    predictor.embed(jobs[1][0])  # a later embedding leaves an earlier one as it was
    assert first.size == (97, 150)
    np.testing.assert_array_equal(predictor.segment_probs(first, jobs[0][1])[0], alone[0])


def test_predictor_misuse_raises(model: CRIS) -> None:
    predictor = Predictor(model)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict("anything")
    predictor.set_image(_image())
    with pytest.raises(ValueError, match="empty"):
        predictor.predict(["fine", ""])
    with pytest.raises(ValueError, match="threshold"):
        Predictor(model, threshold=1.5)
    with pytest.raises(ValueError, match="uint8"):
        predictor.set_image(np.zeros((4, 4, 3), np.float32))
    predictor.reset_image()
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict_probs("anything")


def test_overlay_tints_only_the_mask_and_save_png_is_atomic(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 30), (0, 0, 255))
    mask = np.zeros((30, 40), bool)
    mask[20:, 30:] = True
    out = np.asarray(overlay_mask(img, mask, caption="corner"))
    assert out[25, 35].tolist() != [0, 0, 255] and out[25, 5].tolist() == [0, 0, 255]
    path = save_png(Image.fromarray(out), tmp_path / "sub" / "o.png")
    assert sorted(p.name for p in path.parent.iterdir()) == ["o.png"]
    with pytest.raises(ValueError, match="differs"):
        overlay_mask(img, mask[:10], caption="x")


# ---- cris predict -------------------------------------------------------------------------


def test_cli_writes_mask_at_image_size(
    checkpoint: Path, image_file: Path, tmp_path: Path, model: CRIS,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    rc = main(["predict", "--checkpoint", str(checkpoint), "--image", str(image_file),
               "--text", "the red square", "--out", str(out), "--overlay", str(overlay),
               "--threshold", "0.5"])
    assert rc == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(overlay).size == (W, H)
    predictor = Predictor(model, threshold=0.5)
    predictor.set_image(load_image(image_file))
    np.testing.assert_array_equal(mask == 255, predictor.predict("the red square")[0])
    assert '"mask"' in capsys.readouterr().out


def test_cli_numbers_outputs_for_several_texts(
    checkpoint: Path, image_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m.png"
    rc = main(["predict", "--checkpoint", str(checkpoint), "--image", str(image_file),
               "--text", "a", "--text", "b", "--out", str(out), "--overlay",
               str(tmp_path / "o.png")])
    assert rc == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["m_0.png", "m_1.png", "o_0.png", "o_1.png"]
    assert Image.open(tmp_path / "m_1.png").size == (W, H)


def _bad_checkpoint_garbage(checkpoint: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "garbage"
    bad.mkdir()
    for f in checkpoint.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    return bad


@pytest.mark.parametrize("case", ["corrupt_image", "missing_checkpoint", "garbage_weights",
                                  "empty_text"])
def test_cli_errors_are_one_line(
    case: str, checkpoint: Path, image_file: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt, image, text = checkpoint, image_file, "the red square"
    if case == "corrupt_image":
        image = tmp_path / "broken.jpg"
        image.write_bytes(b"\xff\xd8\xff garbage")
    elif case == "missing_checkpoint":
        ckpt = tmp_path / "nowhere"
    elif case == "garbage_weights":
        ckpt = _bad_checkpoint_garbage(checkpoint, tmp_path)
    else:
        text = "  "
    out = tmp_path / "mask.png"
    rc = main(["predict", "--checkpoint", str(ckpt), "--image", str(image), "--text", text,
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("cris: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not out.exists()
