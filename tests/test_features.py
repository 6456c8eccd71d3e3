"""CLIP feature cache: same losses as the frozen backbone on images, keys, reuse, CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cris_model.cli import main
from cris_model.config import get_preset
from cris_model.data.dataset import RefDataset, collate
from cris_model.data.manifest import MANIFEST_SCHEMA
from cris_model.data.masks import rle_from_mask
from cris_model.features import (
    FeatureDataset,
    build_feature_cache,
    cache_key,
    cache_key_parts,
    find_cache,
)
from cris_model.imaging import normalize
from cris_model.model import CRIS, build_model, cris_loss
from cris_model.training import loop as trainer

SHAPES = [(40, 56), (64, 48), (50, 50), (30, 70), (72, 40), (45, 60)]  # (height, width)


def _prepare(root: Path) -> Path:
    """A prepared folder, split `train`: per image two boxes, each a ref with 3 sentences."""
    rng = np.random.default_rng(1)
    images, out = root / "images", root / "prepared"
    images.mkdir(parents=True)
    out.mkdir()
    rows, ref_id, sent_id = [], 0, 0
    for image_id, (h, w) in enumerate(SHAPES, start=1):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        name = f"img_{image_id}.jpg"
        for colour in ("red", "blue"):
            mask = np.zeros((h, w), dtype=bool)
            top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            mask[top : top + h // 3, left : left + w // 3] = True
            pixels[mask] = (230, 20, 20) if colour == "red" else (20, 20, 230)
            ref_id += 1
            for sentence in (f"{colour} box", f"the {colour} one", f"box {ref_id}"):
                sent_id += 1
                rows.append({
                    "dataset": "refcoco", "split": "train", "ref_id": ref_id,
                    "sent_id": sent_id, "image_id": image_id, "file_name": name, "height": h,
                    "width": w, "sentence": sentence, "raw": sentence,
                    "tokens": sentence.split(), "ann_ids": [ref_id], "category_id": 1,
                    "mask_rle": rle_from_mask(mask), "bbox": [0.0, 0.0, 1.0, 1.0],
                    "no_target": False,
                })
        Image.fromarray(pixels).save(images / name, quality=90)
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out / "train.parquet")
    (out / "summary.json").write_text(json.dumps({"image_dir": str(images.resolve())}))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(tmp_path_factory.mktemp("feat"))


@pytest.fixture(scope="module")
def model() -> CRIS:
    torch.manual_seed(0)
    return build_model(get_preset("cris_tiny", random_init=True)).eval()


@pytest.fixture(scope="module")
def cache(model: CRIS, data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("cache")
    return build_feature_cache(model, data, "train", root, batch_size=4, shard_bytes=300_000)


@pytest.fixture(scope="module")
def half(model: CRIS, data: Path, cache: dict) -> dict:
    """A float16 cache of the same model beside the float32 one (same cache root)."""
    root = Path(cache["path"]).parent.parent
    return build_feature_cache(model, data, "train", root, dtype="float16", batch_size=6)


def _image_step(model: CRIS, batch: dict) -> torch.Tensor:
    """The frozen-backbone step from images: CLIP under no_grad, head with gradients."""
    with torch.no_grad():
        feats = model.encode(normalize(batch["image"]), batch["tokens"])
    return cris_loss(model.head(feats), batch["mask"].unsqueeze(1))


def _cache_step(model: CRIS, batch: dict) -> torch.Tensor:
    feats = {k: batch[k] for k in (*model.image_keys, *model.text_keys)}
    return cris_loss(model.head(feats), batch["mask"].unsqueeze(1))


def test_cache_layout(cache: dict) -> None:
    folder = Path(cache["path"])
    assert folder.parent.name == cache["key"] and folder.name == "train"
    assert cache["sentences"] == 36 and cache["images"] == 6 and cache["refs"] == 12
    assert len(cache["shards"]) >= 2  # the small shard_bytes forces several shards
    assert {p.name for p in folder.iterdir()} == {"index.parquet", "meta.json", *cache["shards"]}
    assert json.loads((folder / "meta.json").read_text())["key"] == cache["key"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def _loss_and_grad(model: CRIS, step: object, batch: dict) -> tuple[float, torch.Tensor]:
    model.zero_grad()
    loss = step(model, batch)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.head_parameters()])


def test_training_from_cache_gives_the_same_losses(model: CRIS, data: Path, cache: dict) -> None:
    """Along a training run (frozen CLIP, head trained from images), each batch read from the
    cache gives the loss and gradient that the same batch gives from images."""
    images = RefDataset(data, "train", model.config.input_size, model.config.word_len, seed=3)
    cached = FeatureDataset(Path(cache["path"]).parent.parent, "train", model=model, seed=3)
    assert len(cached) == len(images) == 12
    trained = copy.deepcopy(model)
    trained.backbone.requires_grad_(False)
    trained.train()
    trained.backbone.eval()
    opt = torch.optim.SGD(trained.head_parameters(), lr=0.01)
    losses = []
    for epoch, picks in enumerate(([0, 5, 11], [2, 9, 1], [4, 6, 10])):
        images.set_epoch(epoch)
        cached.set_epoch(epoch)
        a, b = collate([images[i] for i in picks]), collate([cached[i] for i in picks])
        assert torch.equal(a["sent_id"], b["sent_id"]) and torch.equal(a["mask"], b["mask"])
        loss_c, grad_c = _loss_and_grad(trained, _cache_step, b)
        loss_i, grad_i = _loss_and_grad(trained, _image_step, a)
        losses.append((loss_i, loss_c))
        # CLIP's text GEMMs round differently per batch size (~1e-7), and the random head's
        # BatchNorm over tiny features amplifies that in some gradient entries: compare the
        # gradient as a direction.
        assert torch.nn.functional.cosine_similarity(grad_i, grad_c, dim=0) > 0.999
        opt.step()
    np.testing.assert_allclose(*zip(*losses, strict=True), rtol=0, atol=1e-5)
    assert len({round(x, 3) for x, _ in losses}) == 3  # the head trains: losses move


def test_epochs_draw_different_sentences(model: CRIS, cache: dict) -> None:
    ds = FeatureDataset(Path(cache["path"]), "train", seed=0)
    assert ds.ref_ids == list(range(1, 13))
    drawn = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        drawn |= {ds[i]["sent_id"] for i in range(len(ds))}
    assert len(drawn) > 12  # several sentences of a ref appear across epochs
    per_sentence = FeatureDataset(Path(cache["path"]), "train", sample="sentence")
    assert [per_sentence[i]["sent_id"] for i in range(36)] == list(range(1, 37))


def test_lazy_shards_read_the_same_tensors(cache: dict) -> None:
    eager = FeatureDataset(Path(cache["path"]), "train", sample="sentence", in_memory=True)
    lazy = FeatureDataset(Path(cache["path"]), "train", sample="sentence", in_memory=False)
    for i in (0, 17, 35):
        a, b = eager[i], lazy[i]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


def test_second_call_reuses_without_encoding(model: CRIS, data: Path, cache: dict,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(cache["path"]).parent.parent
    before = {p.name: p.stat().st_mtime_ns for p in Path(cache["path"]).iterdir()}

    def _fail(*_: object) -> None:
        raise AssertionError("encoder called on a cached split")

    monkeypatch.setattr(model, "encode_image", _fail)
    again = build_feature_cache(model, data, "train", root, batch_size=4)
    assert again["reused"] is True and again["key"] == cache["key"]
    assert {p.name: p.stat().st_mtime_ns for p in Path(cache["path"]).iterdir()} == before


def test_changed_manifest_rebuilds(model: CRIS, data: Path, tmp_path: Path) -> None:
    first = build_feature_cache(model, data, "train", tmp_path, batch_size=8)
    table = pq.read_table(data / "train.parquet").to_pandas()
    table.loc[0, "sentence"] = "a different phrase"
    changed = tmp_path / "changed"
    changed.mkdir()
    pq.write_table(pa.Table.from_pandas(table, schema=MANIFEST_SCHEMA, preserve_index=False),
                   changed / "train.parquet")
    (changed / "summary.json").write_text((data / "summary.json").read_text())
    second = build_feature_cache(model, changed, "train", tmp_path, batch_size=8)
    assert second["reused"] is False and second["path"] == first["path"]
    assert second["manifest_sha256"] != first["manifest_sha256"]


def test_key_follows_what_the_features_depend_on(model: CRIS) -> None:
    base = cache_key(cache_key_parts(model))
    assert cache_key(cache_key_parts(copy.deepcopy(model))) == base
    assert cache_key(cache_key_parts(model, "float16")) != base
    other = {}
    for name, overrides in (("input", {"input_size": 64}), ("words", {"word_len": 12})):
        torch.manual_seed(0)
        other[name] = cache_key(cache_key_parts(
            build_model(get_preset("cris_tiny", random_init=True, **overrides))))
    torch.manual_seed(1)
    other["weights"] = cache_key(cache_key_parts(build_model(get_preset("cris_tiny"))))
    assert len({base, *other.values()}) == 4
    with pytest.raises(ValueError, match="feature dtype"):
        cache_key_parts(model, "int8")


def test_float16_cache_is_close_and_separate(model: CRIS, cache: dict, half: dict) -> None:
    root = Path(cache["path"]).parent.parent
    assert half["key"] != cache["key"] and half["dtype"] == "float16"
    full = FeatureDataset(Path(cache["path"]), "train", sample="sentence")
    low = FeatureDataset(Path(half["path"]), "train", sample="sentence")
    a, b = full[3], low[3]
    torch.testing.assert_close(b["img_c3"].float(), a["img_c3"], rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="2 \\("):
        find_cache(root, "train")
    assert find_cache(root, "train", model) == Path(cache["path"])


@pytest.mark.parametrize("in_memory", [True, False])
def test_items_keep_the_stored_dtype(model: CRIS, cache: dict, half: dict,
                                     in_memory: bool) -> None:
    """Floats reach the loader as stored (float16 or float32); masks stay float32 and the
    padding mask bool, so a float16 cache moves half the feature bytes to the trainer."""
    nbytes = {}
    for built, dtype in ((cache, torch.float32), (half, torch.float16)):
        ds = FeatureDataset(Path(built["path"]), "train", model=model, in_memory=in_memory)
        assert ds.in_memory is in_memory
        batch = collate([ds[i] for i in (0, 7)])
        floats = [*model.image_keys, "words", "sentence"]
        assert {k: batch[k].dtype for k in floats} == dict.fromkeys(floats, dtype)
        assert batch["pad_mask"].dtype == torch.bool and batch["mask"].dtype == torch.float32
        assert float(batch["mask"].min()) >= 0 and float(batch["mask"].max()) <= 1
        nbytes[dtype] = sum(batch[k].nbytes for k in floats)
    assert nbytes[torch.float32] == 2 * nbytes[torch.float16]


def _train_from(params: dict, data: Path, out: Path, batch_to: object,
                monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, torch.Tensor]]:
    """Run the real trainer with `_to` (host batch -> device) replaced by `batch_to`; returns
    the saved weights and optimizer state."""
    monkeypatch.setattr(trainer, "_to", batch_to)
    assert trainer.train(params, data, out).steps == 3
    return {name: load_file(str(out / "last" / f"{name}.safetensors"))
            for name in ("model", "train_state")}


def test_float16_cache_trains_bit_identically_to_casting_on_the_host(
    model: CRIS, data: Path, half: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Casting cached float16 features on the device (`_Net`) gives exactly the losses,
    weights and Adam moments of the old path, which cast every batch to float32 on the host."""
    params = {"model": {"preset": "cris_tiny", "random_init": True},
              "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "seed": 0, "max_steps": 3,
                        "freeze_backbone": True, "features_dir": half["path"],
                        "val_split": "train", "tracking": False, "progress": False,
                        "log_every": 1, "gallery_size": 0},
              "eval": {"threshold": 0.35}}
    to, seen = trainer._to, []

    def _as_stored(batch: dict, device: torch.device) -> dict:
        seen.append(batch["img_c3"].dtype)
        return to(batch, device)

    def _float_on_host(batch: dict, device: torch.device) -> dict:
        return to({k: v.float() if v.is_floating_point() else v for k, v in batch.items()},
                  device)

    kept = _train_from(params, data, tmp_path / "kept", _as_stored, monkeypatch)
    cast = _train_from(params, data, tmp_path / "cast", _float_on_host, monkeypatch)
    assert seen == [torch.float16] * 3
    history = [(tmp_path / run / trainer.HISTORY).read_text() for run in ("kept", "cast")]
    assert history[0] == history[1] and len(history[0].splitlines()) == 4
    for name in ("model", "train_state"):
        assert kept[name].keys() == cast[name].keys()
        differ = [k for k in kept[name] if not torch.equal(kept[name][k], cast[name][k])]
        assert not differ, differ[:5]
    initial = model.state_dict()  # the weights train() starts from: the head trained
    assert any(not torch.equal(initial[k], v) for k, v in kept["model"].items()
               if k.startswith("neck."))


def test_cache_of_another_model_is_refused(data: Path, cache: dict) -> None:
    torch.manual_seed(5)
    other = build_model(get_preset("cris_tiny", random_init=True))
    with pytest.raises(ValueError, match="weights_sha256"):
        FeatureDataset(Path(cache["path"]), "train", model=other)
    with pytest.raises(FileNotFoundError, match="no feature cache"):
        find_cache(Path(cache["path"]).parent.parent, "train", other)


def test_failed_build_leaves_nothing(model: CRIS, data: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("train.parquet", "summary.json"):
        (broken / name).write_bytes((data / name).read_bytes())
    images = tmp_path / "images"
    images.mkdir()
    (broken / "summary.json").write_text(json.dumps({"image_dir": str(images)}))
    with pytest.raises(FileNotFoundError, match="img_1.jpg"):
        build_feature_cache(model, broken, "train", tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file() or p.name == "train"] == []


def test_cli_caches_with_params(data: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  preset: cris_tiny\n  random_init: true\ntrain:\n  seed: 0\n")
    args = ["features", "cache", "--params", str(params), "--data", str(data), "--split",
            "train", "--out", str(tmp_path / "f"), "--set", "model.input_size=64",
            "--dtype", "float16"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["input_size"] == 64 and printed["dtype"] == "float16"
    assert (Path(printed["path"]) / "meta.json").is_file()
    torch.manual_seed(0)
    same = build_model(get_preset("cris_tiny", random_init=True, input_size=64))
    assert cache_key(cache_key_parts(same, "float16")) == printed["key"]
    item = FeatureDataset(tmp_path / "f", "train", model=same)[0]
    assert item["mask"].shape == (64, 64) and item["img_c3"].shape[-1] == 8
    assert main([*args[:-2], "--dtype", "float32", "--split", "nope"]) == 1
    assert "nope.parquet: manifest not found" in capsys.readouterr().err
