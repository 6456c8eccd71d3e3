"""CLIP feature cache: run the frozen CLIP encoders once over a split, train the head from disk.

Layout under a cache root F (`cris features cache --out F`):

    F/<key>/<split>/shard-00000.safetensors   image.<k> per image, text.<k> per sentence
    F/<key>/<split>/index.parquet              one row per manifest sentence -> shard, rows
    F/<key>/<split>/meta.json                  the key parts, counts, manifest digest

`<key>` is a short hash of what the features depend on: the CLIP weights themselves (a digest
of the backbone state dict, so a random-init cache is only reused with the very same
weights), the CLIP architecture, the input size, word_len, the stored dtype and this format.
Image features are stored once per image; text features once per sentence; masks are kept
as the manifest's RLE and letterboxed at load time, so training needs no image file.

Cached features are those of the unflipped image and phrase: the cache path cannot apply
flip augmentation (nor the language-blind baseline); train with `train.flip: false`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from cris_model.atomic import staged_dir
from cris_model.backbone import TOKENIZER_NAME, tokenize
from cris_model.data.dataset import load_canvas, open_split
from cris_model.data.masks import mask_from_rle
from cris_model.imaging import Letterbox, letterbox_mask, normalize
from cris_model.model import CRIS, create_model
from cris_model.params import section
from cris_model.training.config import TrainConfig

CACHE_FORMAT = 1  # bump when the layout or the meaning of stored tensors changes
DTYPES = {"float32": torch.float32, "float16": torch.float16}
SHARD_BYTES = 1 << 30  # a shard is closed once it holds this many bytes of features
IN_MEMORY_BYTES = 2 << 30  # FeatureDataset loads a split into RAM when it is this small
_INDEX_COLUMNS = ("ref_id", "sent_id", "image_id", "file_name", "height", "width",
                  "sentence", "mask_rle")


def backbone_digest(model: CRIS) -> str:
    """sha256 hex of the CLIP backbone state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.backbone.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key_parts(model: CRIS, dtype: str = "float32") -> dict[str, Any]:
    """What the cached features depend on; `cache_key` hashes this dict."""
    if dtype not in DTYPES:
        raise ValueError(f"feature dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg = model.config
    if cfg.clip_config:
        arch = json.dumps(cfg.clip_config, sort_keys=True).encode()
        backbone = f"inline:{hashlib.sha256(arch).hexdigest()[:12]}"
    else:
        backbone = cfg.clip_model
    return {
        "format": CACHE_FORMAT,
        "backbone": backbone,
        "pretrained": "random-init" if cfg.random_init else cfg.pretrained,
        "weights_sha256": backbone_digest(model),
        "input_size": cfg.input_size,
        "word_len": cfg.word_len,
        "tokenizer": TOKENIZER_NAME,
        "dtype": dtype,
    }


def cache_key(parts: dict[str, Any]) -> str:
    """16 hex characters naming a cache folder: sha256 of the canonical JSON of `parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _manifest_digest(rows: pd.DataFrame) -> str:
    hashed = pd.util.hash_pandas_object(rows[list(_INDEX_COLUMNS)], index=False)
    return hashlib.sha256(hashed.to_numpy().tobytes()).hexdigest()


def _image_groups(rows: pd.DataFrame) -> list[tuple[int, np.ndarray]]:
    """[(image_id, manifest row indices)] in order of first appearance."""
    groups = rows.groupby("image_id", sort=False).indices
    return [(int(k), np.asarray(v)) for k, v in groups.items()]


class _ShardWriter:
    """Collects per-image and per-sentence tensors and writes a shard when it is full."""

    def __init__(self, folder: Path, dtype: torch.dtype, shard_bytes: int) -> None:
        self.folder, self.dtype, self.shard_bytes = folder, dtype, shard_bytes
        self.shard, self.nbytes = 0, 0
        self.image: dict[str, list[torch.Tensor]] = {}
        self.text: dict[str, list[torch.Tensor]] = {}
        self.images = self.sentences = 0
        self.names: list[str] = []

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu")
        return x.to(self.dtype) if x.is_floating_point() else x

    def add(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> tuple[
            int, int, int]:
        """Append one batch; returns (shard, first image row, first text row) it landed at."""
        at = (self.shard, self.images, self.sentences)
        for store, feats in ((self.image, image), (self.text, text)):
            for k, v in feats.items():
                stored = self._cast(v)
                store.setdefault(k, []).append(stored)
                self.nbytes += stored.numel() * stored.element_size()
        self.images += next(iter(image.values())).shape[0]
        self.sentences += next(iter(text.values())).shape[0]
        return at

    def full(self) -> bool:
        """True once the open shard holds at least shard_bytes."""
        return self.nbytes >= self.shard_bytes

    def flush(self) -> None:
        """Write the open shard (if it holds anything) and start the next one."""
        if not self.images:
            return
        tensors = {f"image.{k}": torch.cat(v).contiguous() for k, v in self.image.items()}
        tensors.update({f"text.{k}": torch.cat(v).contiguous() for k, v in self.text.items()})
        name = f"shard-{self.shard:05d}.safetensors"
        save_file(tensors, str(self.folder / name), metadata={"format": str(CACHE_FORMAT)})
        self.names.append(name)
        self.shard, self.nbytes, self.images, self.sentences = self.shard + 1, 0, 0, 0
        self.image, self.text = {}, {}


def _batches(
    groups: list[tuple[int, np.ndarray]], batch_size: int
) -> Iterator[list[tuple[int, np.ndarray]]]:
    for i in range(0, len(groups), batch_size):
        yield groups[i : i + batch_size]


@torch.inference_mode()
def _encode_split(
    model: CRIS, rows: pd.DataFrame, image_dir: Path, writer: _ShardWriter, device: torch.device,
    batch_size: int,
) -> pd.DataFrame:
    """Encode every image once and every sentence once; returns the index (manifest order)."""
    size, word_len = model.config.input_size, model.config.word_len
    where = np.zeros((len(rows), 3), dtype=np.int64)  # shard, image_row, text_row per row
    for chunk in _batches(_image_groups(rows), batch_size):
        canvases = [load_canvas(image_dir, rows.iloc[int(ix[0])], size)[0] for _, ix in chunk]
        pixels = torch.from_numpy(np.stack(canvases)).permute(0, 3, 1, 2).to(device)
        image = model.encode_image(normalize(pixels))
        order = np.concatenate([ix for _, ix in chunk])
        texts = [str(s) for s in rows["sentence"].to_numpy()[order]]
        parts = [model.encode_text(tokenize(texts[j : j + batch_size], word_len).to(device))
                 for j in range(0, len(texts), batch_size)]
        text = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        shard, first_image, first_text = writer.add(image, text)
        image_rows = np.concatenate([np.full(len(ix), i) for i, (_, ix) in enumerate(chunk)])
        where[order] = np.stack([np.full(len(order), shard), first_image + image_rows,
                                 first_text + np.arange(len(order))], axis=1)
        if writer.full():
            writer.flush()
    writer.flush()
    index = rows[list(_INDEX_COLUMNS)].copy()
    index["shard"], index["image_row"], index["text_row"] = where[:, 0], where[:, 1], where[:, 2]
    return index


def _read_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / "meta.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: feature cache meta is not valid JSON ({e})") from e


def build_feature_cache(
    model: CRIS, data: Path, split: str, out: Path, *, dtype: str = "float32",
    device: str = "cpu", batch_size: int = 32, shard_bytes: int = SHARD_BYTES,
) -> dict[str, Any]:
    """Cache `model`'s CLIP features for every sentence of `data/<split>.parquet` under `out`.

    Reuses an existing cache of the same key and manifest (nothing is recomputed); else writes
    `out/<key>/<split>/` through a temporary folder renamed into place. Returns the meta dict
    plus "path" and "reused".
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows, image_dir = open_split(Path(data), split)
    parts = cache_key_parts(model, dtype)
    key = cache_key(parts)
    dest = Path(out) / key / split
    digest = _manifest_digest(rows)
    meta = _read_meta(dest)
    if meta is not None and meta.get("key") == key and meta.get("manifest_sha256") == digest:
        return {**meta, "path": str(dest), "reused": True}
    start = time.perf_counter()
    with staged_dir(dest) as tmp:
        model = model.to(torch.device(device)).eval()
        writer = _ShardWriter(tmp, DTYPES[dtype], shard_bytes)
        index = _encode_split(model, rows, image_dir, writer, torch.device(device), batch_size)
        index.to_parquet(tmp / "index.parquet", index=False)
        meta = {
            "key": key, **parts, "split": split, "data": str(Path(data).absolute()),
            "manifest_sha256": digest, "sentences": len(index),
            "images": int(index["image_id"].nunique()), "refs": int(index["ref_id"].nunique()),
            "shards": writer.names, "image_keys": list(model.image_keys),
            "text_keys": list(model.text_keys), "seconds": round(time.perf_counter() - start, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return {**meta, "path": str(dest), "reused": False}


def cache_features(
    params: dict[str, Any], data: Path, split: str, out: Path, *, dtype: str = "float32",
    device: str = "cpu", batch_size: int = 32,
) -> dict[str, Any]:
    """`cris features cache`: build the model from params and cache one split's features."""
    model = create_model(params, TrainConfig.from_params(section(params, "train")).seed)
    return build_feature_cache(model, data, split, out, dtype=dtype, device=device,
                               batch_size=batch_size)


def find_cache(root: Path, split: str, model: CRIS | None = None) -> Path:
    """The `<key>/<split>` folder to read under `root`.

    `root` may be the split folder itself, a `<key>` folder, or a cache root; under a root,
    `model` picks its key (float32 first, then float16), else the root must hold exactly one
    cache of `split`. Raises FileNotFoundError / ValueError when none or several fit.
    """
    root = Path(root)
    for folder in (root, root / split):
        if (folder / "meta.json").is_file() and (folder / "index.parquet").is_file():
            return folder
    if model is not None:
        for dtype in DTYPES:
            folder = root / cache_key(cache_key_parts(model, dtype)) / split
            if (folder / "meta.json").is_file():
                return folder
        raise FileNotFoundError(f"{root}: no feature cache of split {split!r} for this model "
                                f"(run `cris features cache` with the same model params)")
    found = sorted(p.parent for p in root.glob(f"*/{split}/meta.json"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.parent.name for p in found)})"
        raise (FileNotFoundError if not found else ValueError)(
            f"{root}: {what} feature caches of split {split!r}; pass the <key> folder"
        )
    return found[0]


class FeatureDataset(Dataset):
    """Cached CLIP features of one split, as training items that need no image file.

    An item is a dict with the keys of `CRIS.encode` for one sample (unbatched, in the
    cache's stored dtype: a float16 cache moves half the bytes through the loader, and the
    trainer casts on the device), `mask` SxS float32 in [0, 1] (the letterboxed truth,
    S = input size), and int ids `index` (manifest row), `ref_id`, `sent_id`: the same ids
    and masks as `RefDataset`.
    `sample="ref"` (training): one item per referred object, its sentence drawn each epoch
    exactly as `RefDataset` draws it (seeded by seed, epoch, item; call `set_epoch`);
    `sample="sentence"`: one item per sentence. No flip: cached features are unflipped.
    Given `model`, the cache must have been made with that model's CLIP weights, input size
    and word_len (ValueError otherwise). `in_memory` loads every shard into RAM up front
    (None: when they total <= IN_MEMORY_BYTES); else shards are memory-mapped, read per item.
    """

    def __init__(
        self, cache_dir: Path, split: str, *, model: CRIS | None = None, sample: str = "ref",
        seed: int = 0, in_memory: bool | None = None,
    ) -> None:
        if sample not in ("ref", "sentence"):
            raise ValueError(f"sample must be 'ref' or 'sentence', got {sample!r}")
        self.folder = find_cache(Path(cache_dir), split, model)
        meta = _read_meta(self.folder)
        if meta is None or meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{self.folder}: not a feature cache of format {CACHE_FORMAT}")
        if model is not None:
            _check_model(self.folder, meta, model)
        self.meta, self.split, self.sample, self.seed, self.epoch = meta, split, sample, seed, 0
        self.input_size = int(meta["input_size"])
        self.rows = pd.read_parquet(self.folder / "index.parquet")
        if sample == "ref":
            groups = self.rows.groupby("ref_id", sort=False).indices
            self.groups = [np.asarray(ix) for ix in groups.values()]
        else:
            self.groups = [np.asarray([i]) for i in range(len(self.rows))]
        size = sum((self.folder / s).stat().st_size for s in meta["shards"])
        self.in_memory = size <= IN_MEMORY_BYTES if in_memory is None else in_memory
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}
        if self.in_memory:  # before DataLoader workers fork, so they share the pages
            self._loaded = {s: load_file(str(self.folder / s)) for s in meta["shards"]}
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def ref_ids(self) -> list[int]:
        """ref_id of every item (all sentences of an item share it)."""
        ids = self.rows["ref_id"].to_numpy()
        return [int(ids[g[0]]) for g in self.groups]

    def set_epoch(self, epoch: int) -> None:
        """Choose which sentence each referred object shows this epoch."""
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _tensor(self, shard: str, name: str, row: int) -> torch.Tensor:
        if self.in_memory:
            return self._loaded[shard][name][row]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[shard].get_slice(name)[row : row + 1][0]

    def features(self, index: int) -> dict[str, torch.Tensor]:
        """CLIP features of manifest row `index` (the keys of `CRIS.encode`, unbatched), as
        stored: float16 or float32 floats (the meta's dtype), the padding mask as bool."""
        row = self.rows.iloc[index]
        shard = self.meta["shards"][int(row["shard"])]
        out = {}
        for prefix, keys, at in (("image", self.meta["image_keys"], int(row["image_row"])),
                                 ("text", self.meta["text_keys"], int(row["text_row"]))):
            for k in keys:
                out[k] = self._tensor(shard, f"{prefix}.{k}", at)
        return out

    def mask(self, index: int) -> torch.Tensor:
        """Letterboxed truth of manifest row `index`: SxS float32 in [0, 1]."""
        row = self.rows.iloc[index]
        h, w = int(row["height"]), int(row["width"])
        box = Letterbox.fit(h, w, self.input_size)
        return torch.from_numpy(letterbox_mask(mask_from_rle(row["mask_rle"], h, w), box))

    def __getitem__(self, item: int) -> dict[str, Any]:
        rows = self.groups[item]
        index = int(rows[0])
        if self.sample == "ref":
            rng = np.random.default_rng([self.seed, self.epoch, item])
            index = int(rows[rng.integers(len(rows))])
        row = self.rows.iloc[index]
        return {**self.features(index), "mask": self.mask(index), "index": index,
                "ref_id": int(row["ref_id"]), "sent_id": int(row["sent_id"])}


def _check_model(folder: Path, meta: dict[str, Any], model: CRIS) -> None:
    """ValueError unless the cache was made by `model`'s CLIP at its input size and word_len."""
    parts = cache_key_parts(model, meta.get("dtype", "float32"))
    for name in ("weights_sha256", "input_size", "word_len", "backbone"):
        if meta.get(name) != parts[name]:
            raise ValueError(f"{folder}: feature cache {name} {meta.get(name)!r} differs from "
                             f"the model's {parts[name]!r}; rebuild it with `cris features cache`")
