"""Readers of the original `refer` files: refs(<splitBy>).p, grefs(unc).json, instances.json,
and the optional side file `sentence_kinds.json` (each sentence's phrase kind).

The `.p` files are pickles downloaded from the internet. They are read with an unpickler that
resolves no global at all, so only plain containers and scalars can come out; anything that
would import or call code is refused. Every record is checked for the keys and types the
rest of the pipeline relies on, and errors name the file and the record.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (dataset, split_by) -> split names that exist for that combination.
SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco", "google"): ("train", "val", "test"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
    ("grefcoco", "unc"): ("train", "val", "testA", "testB"),
}

# Published numbers of referred objects (refs) per split, checked on full copies.
OFFICIAL_REF_COUNTS: dict[tuple[str, str], dict[str, int]] = {
    ("refcoco", "unc"): {"train": 42404, "val": 3811, "testA": 1975, "testB": 1810},
    ("refcoco+", "unc"): {"train": 42278, "val": 3805, "testA": 1975, "testB": 1798},
    ("refcocog", "umd"): {"train": 42226, "val": 2573, "test": 5023},
    ("refcocog", "google"): {"train": 44822, "val": 5000},
}

KINDS_FILE = "sentence_kinds.json"  # optional, beside the refs file: {"<sent_id>": "<kind>"}
# The phrase kinds the synthetic generator records (any other non-empty name is kept as is).
SENTENCE_KINDS = ("attribute", "spatial", "relation", "ordinal", "superlative",
                  "multi-target", "no-target")

_PLAIN = (dict, list, tuple, str, int, float, bool, type(None))


@dataclass(frozen=True)
class Sentence:
    """One referring expression: `sent` is lower-cased and tokenised, `raw` as typed."""

    sent_id: int
    sent: str
    raw: str
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class Ref:
    """One referred object (or set of objects, or none) with its sentences.

    `ann_ids` is empty for a gRefCOCO no-target expression (`ann_id == [-1]`);
    `category_id` is the declared one (the first listed for gRefCOCO, -1 when none).
    """

    ref_id: int
    image_id: int
    ann_ids: tuple[int, ...]
    category_id: int
    split: str
    sentences: tuple[Sentence, ...]

    @property
    def no_target(self) -> bool:
        """True when the expression refers to nothing in the image."""
        return not self.ann_ids


@dataclass(frozen=True)
class ImageInfo:
    """One `images[]` entry of instances.json."""

    image_id: int
    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class Annotation:
    """One `annotations[]` entry; `segmentation` is kept raw (polygons or RLE)."""

    ann_id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    iscrowd: bool
    segmentation: Any


@dataclass(frozen=True)
class Instances:
    """instances.json indexed by id."""

    images: dict[int, ImageInfo]
    annotations: dict[int, Annotation]
    categories: dict[int, str]


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that resolves no global: classes and callables can never be reached."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refers to {module}.{name}; only plain data is allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("uses persistent ids; only plain data is allowed")


def _check_plain(obj: Any, path: Path) -> None:
    """Every object reachable from `obj` is plain data; each container is visited once, so
    a small pickle of shared references (a "billion laughs" of nested lists) stays cheap."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if isinstance(item, dict | list | tuple):
            if id(item) in seen:
                continue
            seen.add(id(item))
        if type(item) not in _PLAIN:
            raise ValueError(f"{path}: pickle holds a {type(item).__name__}; expected plain data")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def load_plain_pickle(path: Path) -> Any:
    """Unpickle a file that may hold only dict/list/tuple/str/int/float/bool/None.

    Python 2 byte strings are decoded as UTF-8. Raises ValueError naming the file when it is
    truncated, corrupt, or refers to any class or function (nothing is imported or called).
    """
    data = Path(path).read_bytes()
    try:
        obj = _PlainUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, OverflowError) as e:
        raise ValueError(f"{path}: unreadable pickle ({e.__class__.__name__}: {e})") from e
    _check_plain(obj, path)
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field(rec: dict, key: str, kind: str, where: str, default: Any = ...) -> Any:
    """rec[key] checked to be `kind` ('int', 'str' or 'list'); `default` when absent."""
    if key not in rec:
        if default is not ...:
            return default
        raise ValueError(f"{where}: missing key {key!r}")
    value = rec[key]
    ok = {
        "int": _is_int(value),
        "str": isinstance(value, str),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        raise ValueError(f"{where}: {key!r} must be {kind}, got {type(value).__name__}")
    return value


def _parse_sentence(rec: Any, where: str) -> Sentence:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: sentence is a {type(rec).__name__}, expected a dict")
    sent_id = _field(rec, "sent_id", "int", where)
    where = f"{where} sent_id {sent_id}"
    sent = _field(rec, "sent", "str", where)
    if not sent.strip():
        raise ValueError(f"{where}: empty sentence")
    raw = _field(rec, "raw", "str", where, default=sent)
    tokens = _field(rec, "tokens", "list", where, default=sent.split())
    if not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{where}: 'tokens' must be a list of strings")
    return Sentence(sent_id, sent.strip(), raw, tuple(tokens))


def _parse_ann_ids(rec: dict, grouped: bool, where: str) -> tuple[int, ...]:
    if "ann_id" not in rec:
        raise ValueError(f"{where}: missing key 'ann_id'")
    value = rec["ann_id"]
    if grouped and _is_int(value):
        value = [value]
    if grouped and isinstance(value, list) and value and all(_is_int(v) for v in value):
        if value == [-1]:
            return ()
        if -1 in value:
            raise ValueError(f"{where}: 'ann_id' mixes -1 (no target) with targets {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"{where}: 'ann_id' lists an annotation twice {value}")
        return tuple(value)
    if not grouped and _is_int(value):
        return (value,)
    kind = "a non-empty list of int" if grouped else "int"
    raise ValueError(f"{where}: 'ann_id' must be {kind}, got {value!r}")


def _parse_category(rec: dict, grouped: bool, where: str) -> int:
    if "category_id" not in rec:
        raise ValueError(f"{where}: missing key 'category_id'")
    value = rec["category_id"]
    if _is_int(value):
        return value
    if grouped and isinstance(value, list) and value and all(_is_int(v) for v in value):
        return next((v for v in value if v != -1), -1)
    kind = "int or a non-empty list of int" if grouped else "int"
    raise ValueError(f"{where}: 'category_id' must be {kind}, got {value!r}")


def _parse_ref(rec: Any, index: int, grouped: bool, splits: tuple[str, ...], where: str) -> Ref:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: entry {index} is a {type(rec).__name__}, expected a dict")
    ref_id = _field(rec, "ref_id", "int", f"{where}: entry {index}")
    where = f"{where}: ref_id {ref_id}"
    image_id = _field(rec, "image_id", "int", where)
    split = _field(rec, "split", "str", where)
    if split not in splits:
        raise ValueError(f"{where}: unknown split {split!r} (expected one of {list(splits)})")
    ann_ids = _parse_ann_ids(rec, grouped, where)
    category_id = _parse_category(rec, grouped, where)
    sent_ids = _field(rec, "sent_ids", "list", where)
    raw_sentences = _field(rec, "sentences", "list", where)
    if not raw_sentences:
        raise ValueError(f"{where}: no sentences")
    sentences = tuple(_parse_sentence(s, where) for s in raw_sentences)
    listed = [s.sent_id for s in sentences]
    if not all(_is_int(s) for s in sent_ids) or sorted(sent_ids) != sorted(listed):
        raise ValueError(f"{where}: sent_ids {sent_ids} do not match sentences' ids {listed}")
    return Ref(ref_id, image_id, ann_ids, category_id, split, sentences)


def refs_file(root: Path, dataset: str, split_by: str) -> Path:
    """Path of the refs file of a dataset/split_by in the refer layout under `root`."""
    if (dataset, split_by) not in SPLITS:
        known = ", ".join(f"{d}/{s}" for d, s in SPLITS)
        raise ValueError(f"no split {split_by!r} for dataset {dataset!r} (known: {known})")
    name = f"grefs({split_by}).json" if dataset == "grefcoco" else f"refs({split_by}).p"
    return Path(root) / dataset / name


def read_refs(path: Path, dataset: str, split_by: str) -> list[Ref]:
    """Read and check a refs(*).p pickle or a grefs(*).json file into Ref records.

    Checks keys and types, split names for the dataset/split_by, sent_ids against the
    sentences, and that ref_id and sent_id are unique. Raises FileNotFoundError/ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: refs file not found")
    grouped = path.suffix == ".json"
    if grouped:
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    else:
        data = load_plain_pickle(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: top level is a {type(data).__name__}, expected a list of refs")
    if not data:
        raise ValueError(f"{path}: holds no refs")
    splits = SPLITS[(dataset, split_by)]
    refs = [_parse_ref(rec, i, grouped, splits, str(path)) for i, rec in enumerate(data)]
    _check_unique(refs, path)
    return refs


def _check_unique(refs: list[Ref], path: Path) -> None:
    ref_ids: set[int] = set()
    sent_ids: set[int] = set()
    for ref in refs:
        if ref.ref_id in ref_ids:
            raise ValueError(f"{path}: duplicate ref_id {ref.ref_id}")
        ref_ids.add(ref.ref_id)
        for s in ref.sentences:
            if s.sent_id in sent_ids:
                raise ValueError(f"{path}: ref_id {ref.ref_id}: duplicate sent_id {s.sent_id}")
            sent_ids.add(s.sent_id)


def _parse_image(rec: Any, where: str) -> ImageInfo:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: image entry is a {type(rec).__name__}, expected a dict")
    image_id = _field(rec, "id", "int", where)
    where = f"{where} id {image_id}"
    file_name = _field(rec, "file_name", "str", where)
    height = _field(rec, "height", "int", where)
    width = _field(rec, "width", "int", where)
    if not file_name or height <= 0 or width <= 0:
        raise ValueError(f"{where}: needs a file_name and a positive height and width")
    return ImageInfo(image_id, file_name, height, width)


def _parse_annotation(rec: Any, where: str) -> Annotation:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: annotation is a {type(rec).__name__}, expected a dict")
    ann_id = _field(rec, "id", "int", where)
    where = f"{where} id {ann_id}"
    bbox = _field(rec, "bbox", "list", where)
    if len(bbox) != 4 or not all(_is_int(v) or isinstance(v, float) for v in bbox):
        raise ValueError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox}")
    iscrowd = rec.get("iscrowd", 0)
    if iscrowd not in (0, 1):
        raise ValueError(f"{where}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")
    if "segmentation" not in rec:
        raise ValueError(f"{where}: missing key 'segmentation'")
    x, y, w, h = (float(v) for v in bbox)
    return Annotation(
        ann_id, _field(rec, "image_id", "int", where), _field(rec, "category_id", "int", where),
        (x, y, w, h), bool(iscrowd), rec["segmentation"],
    )


def _index(items: list, key: str, path: Path) -> dict:
    out: dict = {}
    for item in items:
        item_id = getattr(item, key)
        if item_id in out:
            raise ValueError(f"{path}: duplicate {key} {item_id}")
        out[item_id] = item
    return out


def read_instances(path: Path) -> Instances:
    """Read and check a COCO instances.json (images, annotations, categories), indexed by id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: instances file not found")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level is a {type(data).__name__}, expected a dict")
    lists = {key: _field(data, key, "list", str(path))
             for key in ("images", "annotations", "categories")}
    images = [_parse_image(r, f"{path}: image") for r in lists["images"]]
    anns = [_parse_annotation(r, f"{path}: annotation") for r in lists["annotations"]]
    categories: dict[int, str] = {}
    for rec in lists["categories"]:
        where = f"{path}: category"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: entry is a {type(rec).__name__}, expected a dict")
        cat_id = _field(rec, "id", "int", where)
        if cat_id in categories:
            raise ValueError(f"{path}: duplicate category id {cat_id}")
        categories[cat_id] = _field(rec, "name", "str", f"{where} id {cat_id}")
    return Instances(_index(images, "image_id", path), _index(anns, "ann_id", path), categories)


def read_kinds(path: Path) -> dict[int, str]:
    """A `sentence_kinds.json` side file -> {sent_id: kind}; ValueError naming the file when it
    is not a JSON object of integer-string keys and non-empty string values."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level is a {type(data).__name__}, expected an object "
                         "of sent_id -> kind")
    kinds: dict[int, str] = {}
    for key, kind in data.items():
        if not key.lstrip("-").isdigit() or not isinstance(kind, str) or not kind:
            raise ValueError(f"{path}: entry {key!r}: {kind!r} is not sent_id -> kind name")
        kinds[int(key)] = kind
    return kinds
