"""Synthetic referring data: formats, determinism, splits, phrase meaning, blind baselines."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from cris_model.baselines import (
    blind_oracle_masks,
    every_object_masks,
    ground_truth_masks,
    language_blind_report,
)
from cris_model.cli import main
from cris_model.data.manifest import prepare_dataset, read_manifest
from cris_model.data.masks import rle_from_mask
from cris_model.data.refer import SENTENCE_KINDS
from cris_model.data.synth import (
    CATEGORY_IDS,
    COLOUR_RGB,
    KIND_OF_FAMILY,
    SPLITS,
    _trace_polygons,
    generate,
)
from cris_model.data.synth_grammar import (
    ROUND_SHAPES,
    Desc,
    Query,
    Scene,
    SceneObject,
    evaluate,
    normalize,
    parse,
    render,
)

IMAGES = 40
IMAGE_DIR = Path("images/mscoco/images/train2014")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = generate(out, images=IMAGES, seed=7)
    assert summary["images"] == IMAGES
    return out


def _refs(root: Path) -> list[dict[str, Any]]:
    with open(root / "refcoco" / "refs(unc).p", "rb") as f:
        return pickle.load(f)


def _grefs(root: Path) -> list[dict[str, Any]]:
    return json.loads((root / "grefcoco" / "grefs(unc).json").read_text())


def _instances(root: Path) -> dict[str, Any]:
    return json.loads((root / "refcoco" / "instances.json").read_text())


def _scenes(root: Path) -> dict[int, dict[str, Any]]:
    record = json.loads((root / "synth" / "scenes.json").read_text())
    return {s["image_id"]: s for s in record["scenes"]}


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_files_follow_the_refer_formats(root: Path) -> None:
    raw = (root / "refcoco" / "refs(unc).p").read_bytes()
    assert raw[:2] == b"\x80\x02"  # pickle protocol 2
    inst = _instances(root)
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    assert {c["id"]: c["name"] for c in inst["categories"]} == {
        i: n for n, i in CATEGORY_IDS.items()}
    for im in inst["images"]:
        assert im["file_name"] == f"COCO_train2014_{im['id']:012d}.jpg"
        with Image.open(root / IMAGE_DIR / im["file_name"]) as jpg:
            assert jpg.format == "JPEG" and jpg.size == (im["width"], im["height"])
    for a in inst["annotations"]:
        assert a["iscrowd"] == 0 and a["image_id"] in images
        assert all(isinstance(p, list) and len(p) >= 6 for p in a["segmentation"])
        im = images[a["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], im["height"],
                                                      im["width"]))
        assert a["area"] == mask_utils.area(rle) >= 12 * 12 // 2
        assert a["bbox"] == pytest.approx(list(mask_utils.toBbox(rle)))
    sent_ids = []
    for ref in _refs(root):
        assert list(ref) == ["ref_id", "ann_id", "image_id", "category_id", "split",
                             "file_name", "sent_ids", "sentences"]
        ann = anns[ref["ann_id"]]
        assert (ref["image_id"], ref["category_id"]) == (ann["image_id"], ann["category_id"])
        assert ref["file_name"] == images[ref["image_id"]]["file_name"][:-4] + \
            f"_{ref['ann_id']}.jpg"
        assert 2 <= len(ref["sentences"]) <= 3
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        for s in ref["sentences"]:
            assert s["sent"] == normalize(s["raw"]) and s["tokens"] == s["sent"].split()
        sent_ids += ref["sent_ids"]
    assert len(sent_ids) == len(set(sent_ids))
    assert json.loads((root / "grefcoco" / "instances.json").read_text()) == inst


def test_grefcoco_adds_multi_and_no_target_refs(root: Path) -> None:
    grefs = _grefs(root)
    anns = {a["id"]: a for a in _instances(root)["annotations"]}
    kinds = {"none": 0, "single": 0, "multi": 0}
    for ref in grefs:
        assert isinstance(ref["ann_id"], list) and isinstance(ref["category_id"], list)
        if ref["ann_id"] == [-1]:
            assert ref["category_id"] == [-1] and ref["no_target"]
            kinds["none"] += 1
            continue
        assert ref["category_id"] == [anns[a]["category_id"] for a in ref["ann_id"]]
        assert all(anns[a]["image_id"] == ref["image_id"] for a in ref["ann_id"])
        kinds["single" if len(ref["ann_id"]) == 1 else "multi"] += 1
    assert kinds["single"] == len(_refs(root))
    assert kinds["multi"] >= IMAGES // 2 and kinds["none"] >= IMAGES // 2


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    generate(tmp_path / "a", images=6, seed=3)
    generate(tmp_path / "b", images=6, seed=3)
    generate(tmp_path / "c", images=6, seed=4)
    first = _tree_digest(tmp_path / "a")
    assert len(first) == 6 + 7  # images, 2 instances, refs, grefs, 2 sentence kinds, scenes
    assert first == _tree_digest(tmp_path / "b")
    assert first != _tree_digest(tmp_path / "c")


def test_sentence_kinds_file_reaches_the_manifest(root: Path, tmp_path: Path) -> None:
    """Each sentence's grammar family, as a phrase kind in <dataset>/sentence_kinds.json, is the
    manifest's `kind` column after prepare; every kind occurs, each one a documented name."""
    families = json.loads((root / "synth" / "scenes.json").read_text())["families"]
    assert set(KIND_OF_FAMILY.values()) == set(SENTENCE_KINDS)
    for dataset, refs in (("refcoco", _refs(root)), ("grefcoco", _grefs(root))):
        kinds = json.loads((root / dataset / "sentence_kinds.json").read_text())
        sent_ids = {str(s["sent_id"]) for ref in refs for s in ref["sentences"]}
        assert set(kinds) == sent_ids
        assert kinds == {k: KIND_OF_FAMILY[f] for k, f in families[dataset].items()}
        prepare_dataset(root, dataset, "unc", tmp_path / dataset)
        rows = pd.concat([read_manifest(p) for p in (tmp_path / dataset).glob("*.parquet")])
        assert rows["kind"].tolist() == [kinds[str(i)] for i in rows["sent_id"]]
        expected = set(SENTENCE_KINDS) - ({"multi-target", "no-target"}
                                          if dataset == "refcoco" else set())
        assert set(rows["kind"]) == expected


def test_splits_are_disjoint_by_image_and_about_70_10_10_10(root: Path) -> None:
    split_of: dict[int, set[str]] = {}
    for ref in _refs(root) + _grefs(root):
        split_of.setdefault(ref["image_id"], set()).add(ref["split"])
    assert all(len(s) == 1 for s in split_of.values())
    counts = {s: sum(v == {s} for v in split_of.values()) for s in SPLITS}
    assert counts == {"train": 28, "val": 4, "testA": 4, "testB": 4}
    assert len(split_of) == IMAGES


def test_testA_refers_to_round_shapes_and_testB_to_angular_ones(root: Path) -> None:
    inst = _instances(root)
    shape = {a["id"]: c["name"] for a in inst["annotations"] for c in inst["categories"]
             if c["id"] == a["category_id"]}
    seen: dict[str, set[bool]] = {s: set() for s in SPLITS}
    for ref in _refs(root) + _grefs(root):
        ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
        seen[ref["split"]] |= {shape[a] in ROUND_SHAPES for a in ids if a != -1}
    assert seen["testA"] == {True} and seen["testB"] == {False}
    assert seen["train"] == {True, False}


def _crisp(q: Query, objs: list[dict[str, Any]], hidden: set[tuple[int, int]]) -> set[int]:
    """The plain meaning of a query, written independently of the generator's margins."""
    def fits(o: dict[str, Any], d: Desc) -> bool:
        return d.colour in (None, o["colour"]) and d.shape in (None, o["shape"])

    cands = [o for o in objs if fits(o, q.desc)]
    if q.kind in ("extreme", "ordinal"):
        sign, attr = {"left": (1, "cx"), "right": (-1, "cx"), "top": (1, "cy"),
                      "bottom": (-1, "cy"), "largest": (-1, "area"),
                      "smallest": (1, "area")}[q.which or ""]
        order = sorted(cands, key=lambda o: sign * o[attr])
        assert len(order) >= q.rank + (q.kind == "extreme")
        pick = sign * order[q.rank - 1][attr]
        assert sum(sign * o[attr] < pick for o in order) == q.rank - 1
        assert sum(sign * o[attr] == pick for o in order) == 1
        cands = [order[q.rank - 1]]
    elif q.kind == "relation":
        (land,) = [o for o in objs if fits(o, q.landmark or Desc())]
        test = {"left": lambda o: o["cx"] < land["cx"], "right": lambda o: o["cx"] > land["cx"],
                "above": lambda o: o["cy"] < land["cy"], "below": lambda o: o["cy"] > land["cy"],
                "front": lambda o: (o["key"], land["key"]) in hidden,
                "behind": lambda o: (land["key"], o["key"]) in hidden}[q.relation or ""]
        cands = [o for o in cands if o is not land and test(o)]
    keys = {o["key"] for o in cands}
    assert q.plural or len(keys) <= 1, f"singular phrase selects {keys}"
    assert q.count is None or len(keys) == q.count
    return keys


def test_every_phrase_selects_exactly_its_targets(root: Path) -> None:
    scenes = _scenes(root)
    checked = 0
    for ref in _refs(root) + _grefs(root):
        scene = scenes[ref["image_id"]]
        hidden = {(f, b) for f, b, _ in scene["hidden"]}
        ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
        target = {a for a in ids if a != -1}
        for s in ref["sentences"]:
            assert _crisp(parse(s["sent"]), scene["objects"], hidden) == target, s["sent"]
            checked += 1
    assert checked > 10 * IMAGES


def test_visible_parts_are_disjoint_partial_and_drawn_in_their_colour(root: Path) -> None:
    inst = _instances(root)
    scenes = _scenes(root)
    palette = np.array(list(COLOUR_RGB.values()), dtype=np.float64)
    for im in inst["images"]:
        pixels = np.asarray(Image.open(root / IMAGE_DIR / im["file_name"]), dtype=np.float64)
        objs = {o["key"]: o for o in scenes[im["id"]]["objects"]}
        taken = np.zeros((im["height"], im["width"]), dtype=bool)
        for a in (a for a in inst["annotations"] if a["image_id"] == im["id"]):
            m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
                a["segmentation"], im["height"], im["width"]))).astype(bool)
            assert not (m & taken).any()
            taken |= m
            assert m.sum() >= 0.5 * objs[a["id"]]["area"]
            mean = np.median(pixels[m], axis=0)
            nearest = list(COLOUR_RGB)[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))]
            assert nearest == objs[a["id"]]["colour"]


def test_traced_outlines_rasterise_back_and_refuse_holes() -> None:
    mask = np.zeros((9, 11), dtype=bool)
    mask[1:4, 1:5] = True
    mask[4, 5] = True  # touches the block only at a corner
    mask[5:8, 3:10] = True
    mask[6, 9] = False
    polys = _trace_polygons(mask)
    assert polys is not None and len(polys) == 2
    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, 9, 11)))
    assert np.array_equal(back.astype(bool), mask)
    ring = np.ones((5, 5), dtype=bool)
    ring[2, 2] = False
    assert _trace_polygons(ring) is None


def _scene(*objs: tuple[str, str, float, float, float]) -> Scene:
    return Scene(100, 100, tuple(SceneObject(k, s, c, a, x, y)
                                 for k, (s, c, a, x, y) in enumerate(objs)), {(2, 0): 0.2})


def test_meaning_is_clear_only_with_a_margin() -> None:
    scene = _scene(("circle", "red", 300, 20, 50), ("circle", "blue", 300, 25, 50),
                   ("square", "red", 700, 80, 50))
    assert evaluate(Query("extreme", Desc(None, "circle"), "left"), scene) is None
    assert evaluate(Query("extreme", Desc(), "left"), scene) is None
    assert evaluate(Query("extreme", Desc("red"), "left"), scene) == {0}
    assert evaluate(Query("extreme", Desc(), "largest"), scene) == {2}
    assert evaluate(Query("desc", Desc(None, "circle")), scene) is None  # two circles
    assert evaluate(Query("desc", Desc(None, "circle"), plural=True, count=2), scene) == {0, 1}
    assert evaluate(Query("desc", Desc("green", "star")), scene) == frozenset()
    assert evaluate(Query("relation", Desc(), relation="front", landmark=Desc("red", "circle")),
                    scene) == {2}
    assert evaluate(Query("relation", Desc(None, "circle"), relation="left",
                          landmark=Desc(None, "square")), scene) is None  # plural result


@pytest.mark.parametrize("query", [
    Query("desc", Desc("red", "circle")),
    Query("desc", Desc("red")),
    Query("extreme", Desc(None, "star"), "left"),
    Query("extreme", Desc("blue"), "bottom"),
    Query("extreme", Desc(), "smallest"),
    Query("ordinal", Desc(None, "oval"), "right", 3),
    Query("relation", Desc("green", "hexagon"), relation="left", landmark=Desc("yellow")),
    Query("relation", Desc(), relation="front", landmark=Desc(None, "triangle")),
    Query("desc", Desc(None, "square"), plural=True, count=2),
    Query("relation", Desc("purple"), relation="below", landmark=Desc("orange", "square"),
          plural=True),
])
def test_wordings_parse_back_to_their_query(query: Query) -> None:
    rng = np.random.default_rng(0)
    for _ in range(12):
        assert parse(normalize(render(query, rng))) == query


def test_parse_rejects_words_outside_the_grammar() -> None:
    with pytest.raises(ValueError, match="cannot parse"):
        parse("the red banana")
    with pytest.raises(ValueError, match="cannot parse"):
        parse("the red circle near the blue square")


def _manifest(rows: list[tuple[int, np.ndarray]]) -> pd.DataFrame:
    return pd.DataFrame([{"image_id": i, "mask_rle": rle_from_mask(m), "height": m.shape[0],
                          "width": m.shape[1]} for i, m in rows])


def test_blind_baselines_on_hand_made_manifest() -> None:
    a = np.zeros((4, 8), dtype=bool)
    a[:, :2] = True  # 8 px
    b = np.zeros((4, 8), dtype=bool)
    b[:, 4:] = True  # 16 px
    df = _manifest([(1, a), (1, a), (1, b), (2, b)])
    gts = ground_truth_masks(df)
    oracle = blind_oracle_masks(df, gts)
    assert all(np.array_equal(m, a) for m in oracle[:3]) and np.array_equal(oracle[3], b)
    every = every_object_masks(df, gts)
    assert np.array_equal(every[0], a | b) and np.array_equal(every[3], b)
    report = language_blind_report(df)
    assert report["blind_oracle_mIoU"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert report["every_object_mIoU"] == pytest.approx((8 / 24 * 2 + 16 / 24 + 1) / 4)
    with pytest.raises(ValueError, match="mask_rle"):
        language_blind_report(df.drop(columns=["mask_rle"]))


@pytest.mark.parametrize("dataset", ["refcoco", "grefcoco"])
def test_language_blind_predictors_score_far_below_the_truth(
        root: Path, tmp_path: Path, dataset: str) -> None:
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--root", str(root), "--dataset", dataset,
                 "--split-by", "unc", "--out", str(out)]) == 0
    df = read_manifest(out / "train.parquet")
    assert df["no_target"].any() == (dataset == "grefcoco")
    report = language_blind_report(df)
    assert report["blind_oracle"]["mIoU"] == report["blind_oracle_mIoU"] < 0.5
    assert report["every_object_mIoU"] < 0.5
    from cris_model.metrics import evaluate_masks

    gts = ground_truth_masks(df)
    assert evaluate_masks(gts, gts)["mIoU"] == 1.0


def test_cli_writes_and_refuses_foreign_folders(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--images", "4", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["images"] == dict.fromkeys(SPLITS, 1)
    assert main(["data", "synth", "--out", str(out), "--images", "5", "--seed", "1"]) == 0
    assert len(list((out / IMAGE_DIR).iterdir())) == 5
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["data", "synth", "--out", str(foreign), "--images", "4"]) == 1
    assert "refusing to replace" in capsys.readouterr().err
    assert (foreign / "keep.txt").read_text() == "mine"
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--images", "3"]) == 1
    assert "images must be >= 4" in capsys.readouterr().err


def test_image_sizes_and_grain_are_configurable(tmp_path: Path) -> None:
    from cris_model.data.synth import SynthConfig

    sizes = ((200, 150), (150, 200))
    smooth, grainy = (SynthConfig(image_sizes=sizes, min_radius=15, max_radius=30,
                                  pixel_noise=noise) for noise in (0.0, 25.0))
    generate(tmp_path / "smooth", images=4, seed=0, config=smooth)
    generate(tmp_path / "grainy", images=4, seed=0, config=grainy)
    inst = json.loads((tmp_path / "smooth" / "refcoco" / "instances.json").read_text())
    assert {(im["width"], im["height"]) for im in inst["images"]} <= set(sizes)
    files = sorted((tmp_path / "smooth" / IMAGE_DIR).glob("*.jpg"))
    for f in files:
        with Image.open(f) as img:
            assert img.size in sizes
    weight = {name: sum(p.stat().st_size for p in (tmp_path / name / IMAGE_DIR).glob("*.jpg"))
              for name in ("smooth", "grainy")}
    assert weight["grainy"] > 2 * weight["smooth"]  # grain is what makes JPEGs heavy
    for bad in (SynthConfig(image_sizes=()), SynthConfig(image_sizes=((0, 10),)),
                SynthConfig(pixel_noise=-1.0)):
        with pytest.raises(ValueError, match="image_sizes|pixel_noise"):
            generate(tmp_path / "bad", images=4, seed=0, config=bad)
