"""Readers of the original refer files and the pycocotools mask helpers."""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import numpy as np
import pytest
from fixtures.refer_fixture import ANNOTATIONS, IMAGES, write_refer_fixture
from pycocotools import mask as mask_utils

from cris_model.data.masks import (
    mask_from_rle,
    rle_from_mask,
    rle_run_lengths,
    segmentation_rle,
    union_rle,
)
from cris_model.data.refer import load_plain_pickle, read_instances, read_refs, refs_file


class _Exploit:
    """Unpickling this calls exec: creates `marker` when an unpickler resolves globals."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


class _Plain:
    """An ordinary class: its pickle refers to this module by name."""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_refer_fixture(tmp_path_factory.mktemp("refer"))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_pickle_round_trips(tmp_path: Path, protocol: int) -> None:
    data = [{"a": 1, "b": [1.5, None, True], "c": ("x", -7)}, "é", 2**70]
    path = tmp_path / "plain.p"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert load_plain_pickle(path) == data


def test_malicious_pickle_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps([{"ref_id": 1, "x": _Exploit(marker)}], protocol=2)
    pickle.loads(payload)  # the unrestricted unpickler really runs the payload
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "refs(unc).p"
    path.write_bytes(payload)
    refused = r"refs\(unc\)\.p: unreadable pickle.*exec; only plain data"
    with pytest.raises(ValueError, match=refused):
        load_plain_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("obj", [{1, 2}, _Plain(), b"bytes", np.int64(3)])
def test_pickle_of_anything_but_plain_data_is_refused(tmp_path: Path, obj: object) -> None:
    path = tmp_path / "x.p"
    path.write_bytes(pickle.dumps([obj], protocol=2))
    with pytest.raises(ValueError, match="only plain data"):
        load_plain_pickle(path)


def test_python2_byte_strings_are_read_as_utf8(tmp_path: Path) -> None:
    # protocol 2, list of two Python 2 `str` (SHORT_BINSTRING): 'guy', 'caf\xc3\xa9'
    path = tmp_path / "py2.p"
    path.write_bytes(b"\x80\x02]q\x00(U\x03guyq\x01U\x05caf\xc3\xa9q\x02e.")
    assert load_plain_pickle(path) == ["guy", "café"]


@pytest.mark.parametrize("cut", [1, 10, 100])
def test_truncated_pickle_is_rejected(root: Path, tmp_path: Path, cut: int) -> None:
    data = (root / "refcoco" / "refs(unc).p").read_bytes()
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data[:-cut])
    with pytest.raises(ValueError, match="unreadable pickle"):
        load_plain_pickle(path)


def test_read_refs_refcoco(root: Path) -> None:
    refs = read_refs(refs_file(root, "refcoco", "unc"), "refcoco", "unc")
    assert [r.ref_id for r in refs] == [1, 2, 3, 4, 5, 6]
    first = refs[0]
    assert (first.image_id, first.ann_ids, first.category_id, first.split) == (
        101, (1001,), 1, "train")
    assert [(s.sent_id, s.raw, s.sent) for s in first.sentences] == [
        (11, "Man on the LEFT.", "man on the left"), (12, "left guy", "left guy")]
    assert first.sentences[0].tokens == ("man", "on", "the", "left")
    assert not any(r.no_target for r in refs)


def test_read_grefs_multi_and_no_target(root: Path) -> None:
    refs = {r.ref_id: r for r in read_refs(refs_file(root, "grefcoco", "unc"), "grefcoco", "unc")}
    assert refs[41].ann_ids == (1001, 1002) and refs[41].category_id == 1
    assert refs[42].no_target and refs[42].ann_ids == () and refs[42].category_id == -1
    assert refs[46].ann_ids == (1006,) and refs[46].category_id == 44


def test_read_instances_indexes_by_id(root: Path) -> None:
    inst = read_instances(root / "refcoco" / "instances.json")
    assert set(inst.images) == set(IMAGES) and set(inst.annotations) == set(ANNOTATIONS)
    assert inst.images[104].height == 44 and inst.images[104].width == 36
    assert inst.annotations[1003].iscrowd and not inst.annotations[1004].iscrowd
    assert inst.categories[62] == "chair"


@pytest.mark.parametrize(("dataset", "split_by"), [("refcoco+", "umd"), ("grefcoco", "google"),
                                                   ("refcocog", "unc"), ("coco", "unc")])
def test_unknown_dataset_split_by_is_rejected(dataset: str, split_by: str) -> None:
    with pytest.raises(ValueError, match=f"no split '{split_by}' for dataset"):
        refs_file(Path("/data"), dataset, split_by)


def _reference_mask(seg: object, h: int, w: int) -> np.ndarray:
    """pycocotools used directly: decode every part and OR them."""
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects([p for p in seg if len(p) >= 6], h, w)
        return np.any(mask_utils.decode(rles), axis=2)
    if isinstance(seg["counts"], list):
        return mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).astype(bool)
    return mask_utils.decode({"size": [h, w], "counts": seg["counts"].encode()}).astype(bool)


@pytest.mark.parametrize("ann_id", sorted(ANNOTATIONS))
def test_segmentation_matches_pycocotools(ann_id: int) -> None:
    image_id, _, _, _, seg = ANNOTATIONS[ann_id]
    w, h = IMAGES[image_id]
    rle, skipped = segmentation_rle(seg, h, w)
    mask = mask_from_rle(union_rle([rle], h, w), h, w)
    assert mask.shape == (h, w) and mask.dtype == bool
    np.testing.assert_array_equal(mask, _reference_mask(seg, h, w))
    assert skipped == (1 if ann_id == 1007 else 0)


def test_hand_checked_masks() -> None:
    rle, _ = segmentation_rle(ANNOTATIONS[1004][4], 36, 48)
    expected = np.zeros((36, 48), bool)
    expected[2:14, 3:7] = True
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), expected)
    rle, _ = segmentation_rle(ANNOTATIONS[1006][4], 32, 32)
    expected = np.zeros((32, 32), bool)
    expected[12:20, 9:13] = True
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), expected)
    two_parts = mask_from_rle(union_rle([segmentation_rle(ANNOTATIONS[1001][4], 30, 40)[0]],
                                        30, 40), 30, 40)
    assert two_parts[8, 7] and two_parts[21, 7] and not two_parts[16, 7] and not two_parts[0, 30]


def test_union_of_several_annotations_and_of_none() -> None:
    a = np.zeros((10, 12), bool)
    a[1:4, 1:5] = True
    b = np.zeros((10, 12), bool)
    b[3:8, 4:11] = True
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in (a, b)]
    np.testing.assert_array_equal(mask_from_rle(union_rle(rles, 10, 12), 10, 12), a | b)
    assert not mask_from_rle(union_rle([], 10, 12), 10, 12).any()


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trip_and_run_lengths(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((17, 23)) < (0.1 + 0.2 * seed)
    counts = rle_from_mask(mask)
    np.testing.assert_array_equal(mask_from_rle(counts, 17, 23), mask)
    flat = mask.T.reshape(-1)  # column-major, as COCO stores runs
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    runs = list(np.diff(edges))
    if flat[0]:
        runs = [0, *runs]
    assert rle_run_lengths(counts).tolist() == runs


@pytest.mark.parametrize(("counts", "problem"), [
    ("5:", "cover 15 pixels"), ("", "cover 0 pixels"), ("5:P", "ends inside"),
    ("5\x7f", "invalid character"), ("\\98h000000db0", "cover 1024 pixels"),
])
def test_malformed_rle_is_rejected(counts: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        mask_from_rle(counts, 20, 30)


@pytest.mark.parametrize(("seg", "problem"), [
    ([[1, 1, 6, 1]], "no polygon part has at least 3 points"),
    ([[1, 1, 6, 1, 4]], "odd number"),
    ([[1, 1, "6", 1, 4, 4]], "list of numbers"),
    ([], "non-empty polygon list"),
    ({"counts": [5, 10, 585], "size": [30, 20]}, "differs from image size"),
    ({"counts": [5, 10, 500], "size": [20, 30]}, "cover 515 pixels"),
    ({"counts": [5, -10, 605], "size": [20, 30]}, "negative run"),
    ({"counts": b"5:Yb0", "size": [20, 30]}, "string or a list of integers"),
    ({"size": [20, 30]}, "needs 'counts'"),
])
def test_malformed_segmentation_is_rejected(seg: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        segmentation_rle(seg, 20, 30)
