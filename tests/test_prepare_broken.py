"""A corpus of broken inputs: each is refused by `cris data prepare` with one clear line.

Every case breaks the hand-written fixture in one way, runs the real CLI and checks: exit 1,
exactly one stderr line naming the file (or value) and the problem, no traceback, and no
output folder (finished or half-written) left behind. Corrupt JPEGs and images whose size
differs from instances.json are `cris data validate`'s part of the corpus.
"""

from __future__ import annotations

import builtins
import json
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fixtures.refer_fixture import IMAGE_DIR, file_name, write_refer_fixture

from cris_model.cli import main

REFS = Path("refcoco") / "refs(unc).p"
GREFS = Path("grefcoco") / "grefs(unc).json"
INSTANCES = Path("refcoco") / "instances.json"


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _edit_pickle(root: Path, edit: Callable[[list[dict[str, Any]]], Any]) -> None:
    """Change the fixture's refs(unc).p in place (`edit` mutates the list of refs)."""
    path = root / REFS
    refs = pickle.loads(path.read_bytes())
    edit(refs)
    path.write_bytes(pickle.dumps(refs, protocol=2))


def _edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    """Change a JSON file in place (`edit` mutates the loaded data)."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _ref(refs: list[dict[str, Any]], ref_id: int) -> dict[str, Any]:
    return next(r for r in refs if r["ref_id"] == ref_id)


def _ann(inst: dict[str, Any], ann_id: int) -> dict[str, Any]:
    return next(a for a in inst["annotations"] if a["id"] == ann_id)


def _set(d: dict[str, Any], **values: Any) -> None:
    d.update(values)


def _crowd_target(refs: list[dict[str, Any]]) -> None:
    _set(_ref(refs, 2), ann_id=1003, category_id=1)


def _sent_ids_mismatch(refs: list[dict[str, Any]]) -> None:
    _ref(refs, 1)["sent_ids"] = [11, 99]


def _duplicate_sent_id(refs: list[dict[str, Any]]) -> None:
    _ref(refs, 2)["sentences"][0]["sent_id"] = 11
    _ref(refs, 2)["sent_ids"] = [11]


def _duplicate_ref_id(refs: list[dict[str, Any]]) -> None:
    _ref(refs, 2)["ref_id"] = 1


def _truncate(root: Path) -> None:
    data = (root / REFS).read_bytes()
    (root / REFS).write_bytes(data[: len(data) // 2])


def _malicious(root: Path) -> None:
    (root / REFS).write_bytes(pickle.dumps([_Exploit(root / "pwned")], protocol=2))


# (id, dataset, split_by, break the fixture, substrings the error line must hold)
CASES: list[tuple[str, str, str, Callable[[Path], Any], list[str]]] = [
    ("truncated-pickle", "refcoco", "unc", _truncate, ["refs(unc).p", "unreadable pickle"]),
    ("malicious-pickle", "refcoco", "unc", _malicious, ["refs(unc).p", "only plain data"]),
    ("not-a-pickle", "refcoco", "unc",
     lambda r: (r / REFS).write_text('[{"ref_id": 1}]'), ["refs(unc).p", "unreadable pickle"]),
    ("pickle-not-a-list", "refcoco", "unc",
     lambda r: (r / REFS).write_bytes(pickle.dumps({"refs": []}, protocol=2)),
     ["refs(unc).p", "top level is a dict, expected a list"]),
    ("empty-refs", "refcoco", "unc",
     lambda r: _edit_pickle(r, lambda refs: refs.clear()), ["refs(unc).p", "holds no refs"]),
    ("json-not-a-list", "grefcoco", "unc",
     lambda r: (r / GREFS).write_text(json.dumps({"refs": []})),
     ["grefs(unc).json", "top level is a dict, expected a list"]),
    ("json-truncated", "grefcoco", "unc",
     lambda r: (r / GREFS).write_text((r / GREFS).read_text()[:200]),
     ["grefs(unc).json", "not valid JSON"]),
    ("missing-key", "refcoco", "unc",
     lambda r: _edit_pickle(r, lambda refs: _ref(refs, 3).pop("sentences")),
     ["refs(unc).p", "ref_id 3", "missing key 'sentences'"]),
    ("wrong-type", "refcoco", "unc",
     lambda r: _edit_pickle(r, lambda refs: _set(_ref(refs, 4), image_id="102")),
     ["refs(unc).p", "ref_id 4", "'image_id' must be int, got str"]),
    ("unknown-split", "refcoco", "unc",
     lambda r: _edit_pickle(r, lambda refs: _set(_ref(refs, 5), split="test")),
     ["refs(unc).p", "unknown split 'test'"]),
    ("ann-id-nowhere", "refcoco", "unc",
     lambda r: _edit_pickle(r, lambda refs: _set(_ref(refs, 2), ann_id=9999)),
     ["refs(unc).p", "ann_id 9999 not found in", "instances.json"]),
    ("image-id-nowhere", "refcoco", "unc",
     lambda r: _edit_pickle(r, lambda refs: _set(_ref(refs, 2), image_id=777)),
     ["refs(unc).p", "image_id 777 not found in", "instances.json"]),
    ("ann-of-another-image", "refcoco", "unc",
     lambda r: _edit_pickle(r, lambda refs: _set(_ref(refs, 2), ann_id=1004, category_id=18)),
     ["refs(unc).p", "ann_id 1004 belongs to image 102"]),
    ("category-mismatch", "refcoco", "unc",
     lambda r: _edit_pickle(r, lambda refs: _set(_ref(refs, 2), category_id=18)),
     ["refs(unc).p", "category_id 18 differs"]),
    ("crowd-target", "refcoco", "unc", lambda r: _edit_pickle(r, _crowd_target),
     ["refs(unc).p", "ann_id 1003 is a crowd annotation"]),
    ("empty-sentence", "refcoco", "unc",
     lambda r: _edit_pickle(r, lambda refs: _set(_ref(refs, 3)["sentences"][1], sent="  ")),
     ["refs(unc).p", "sent_id 15", "empty sentence"]),
    ("sent-ids-mismatch", "refcoco", "unc", lambda r: _edit_pickle(r, _sent_ids_mismatch),
     ["refs(unc).p", "ref_id 1", "do not match"]),
    ("duplicate-sent-id", "refcoco", "unc", lambda r: _edit_pickle(r, _duplicate_sent_id),
     ["refs(unc).p", "duplicate sent_id 11"]),
    ("duplicate-ref-id", "refcoco", "unc", lambda r: _edit_pickle(r, _duplicate_ref_id),
     ["refs(unc).p", "duplicate ref_id 1"]),
    ("polygon-two-points", "refcoco", "unc",
     lambda r: _edit_json(r / INSTANCES,
                          lambda d: _set(_ann(d, 1002), segmentation=[[20, 8, 36, 8]])),
     ["instances.json", "annotation 1002", "at least 3 points"]),
    ("polygon-odd-coordinates", "refcoco", "unc",
     lambda r: _edit_json(r / INSTANCES,
                          lambda d: _set(_ann(d, 1002), segmentation=[[20, 8, 36, 8, 30]])),
     ["instances.json", "annotation 1002", "odd number of coordinates"]),
    ("rle-wrong-size", "refcoco", "unc",
     lambda r: _edit_json(r / INSTANCES, lambda d: _ann(d, 1004)["segmentation"].update(
         size=[48, 36])), ["instances.json", "annotation 1004", "differs from image size"]),
    ("rle-corrupt-string", "refcoco", "unc",
     lambda r: _edit_json(r / INSTANCES, lambda d: _ann(d, 1006)["segmentation"].update(
         counts="\\98h0")), ["instances.json", "annotation 1006", "RLE runs cover"]),
    ("missing-instances", "refcoco", "unc", lambda r: (r / INSTANCES).unlink(),
     ["instances.json", "not found"]),
    ("instances-not-json", "refcoco", "unc", lambda r: (r / INSTANCES).write_text("{'images'"),
     ["instances.json", "not valid JSON"]),
    ("instances-missing-list", "refcoco", "unc",
     lambda r: _edit_json(r / INSTANCES, lambda d: d.pop("annotations")),
     ["instances.json", "missing key 'annotations'"]),
    ("image-zero-height", "refcoco", "unc",
     lambda r: _edit_json(r / INSTANCES, lambda d: _set(d["images"][0], height=0)),
     ["instances.json", "image id 101", "positive height"]),
    ("missing-refs-file", "refcoco", "google", lambda r: None, ["refs(google).p", "not found"]),
    ("no-such-split-by", "refcoco+", "umd", lambda r: None,
     ["no split 'umd' for dataset 'refcoco+'"]),
    ("missing-image", "refcoco", "unc",
     lambda r: (r / IMAGE_DIR / file_name(103)).unlink(),
     [file_name(103), "image not found", "1 of 4"]),
    ("missing-image-folder", "refcoco", "unc",
     lambda r: [p.unlink() for p in (r / IMAGE_DIR).iterdir()] and (r / IMAGE_DIR).rmdir(),
     ["train2014", "images folder not found"]),
    ("grefs-mixed-no-target", "grefcoco", "unc",
     lambda r: _edit_json(r / GREFS, lambda refs: _set(refs[0], ann_id=[1001, -1])),
     ["grefs(unc).json", "ref_id 41", "mixes -1"]),
    ("grefs-empty-ann-list", "grefcoco", "unc",
     lambda r: _edit_json(r / GREFS, lambda refs: _set(refs[2], ann_id=[])),
     ["grefs(unc).json", "ref_id 43", "'ann_id' must be a non-empty list"]),
    ("grefs-entry-not-a-dict", "grefcoco", "unc",
     lambda r: _edit_json(r / GREFS, lambda refs: refs.append("ref")),
     ["grefs(unc).json", "entry 6 is a str"]),
]


@pytest.mark.parametrize(("dataset", "split_by", "breaker", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 dataset: str, split_by: str, breaker: Callable[[Path], Any],
                                 expected: list[str]) -> None:
    root = write_refer_fixture(tmp_path / "root")
    breaker(root)
    parent = tmp_path / "prepared"
    out = parent / dataset
    rc = main(["data", "prepare", "--root", str(root), "--dataset", dataset,
               "--split-by", split_by, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cris: error: "), captured.err
    for part in expected:
        assert part in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""
    assert not out.exists()
    assert not parent.exists() or not any(parent.iterdir())
    assert not (root / "pwned").exists()


def test_out_path_that_is_a_file_is_left_alone(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = write_refer_fixture(tmp_path / "root")
    out = tmp_path / "out"
    out.write_text("a file")
    rc = main(["data", "prepare", "--root", str(root), "--dataset", "refcoco",
               "--split-by", "unc", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip() == f"cris: error: {out}: output path exists and is not a folder"
    assert out.read_text() == "a file"


def test_failed_prepare_keeps_the_earlier_output(tmp_path: Path) -> None:
    root = write_refer_fixture(tmp_path / "root")
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--root", str(root), "--dataset", "refcoco",
                 "--split-by", "unc", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _truncate(root)
    assert main(["data", "prepare", "--root", str(root), "--dataset", "refcoco",
                 "--split-by", "unc", "--out", str(out)]) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "root"]


@pytest.mark.parametrize("breaker", [_truncate, _malicious], ids=["truncated", "malicious"])
def test_console_script_reports_one_line(tmp_path: Path, breaker: Callable[[Path], Any]) -> None:
    root = write_refer_fixture(tmp_path / "root")
    breaker(root)
    cmd = [sys.executable, "-c", "import sys; from cris_model.cli import main; sys.exit(main())",
           "data", "prepare", "--root", str(root), "--dataset", "refcoco", "--split-by", "unc",
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("cris: error: ")
    assert "refs(unc).p" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (root / "pwned").exists()
