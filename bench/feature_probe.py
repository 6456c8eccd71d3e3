"""Linear probes of a checkpoint's two encoders: what do they know about the referred object?

Image side: each training and val referred object's image features (`img_c3`, `img_c4`,
`img_pool`), averaged inside its ground-truth mask, predict its instance category. Text side:
the sentence embedding of each phrase that names exactly one of `--words` predicts which one.
A logistic regression is fitted on train and scored on val; the majority class's val share is
reported beside it as chance. On the synthetic data the categories are the six shapes, so this
says whether a model that fails on shape phrases fails to see shapes, to read shape words, or
to match the two (BENCHMARKS.md, issue 13). Prints one JSON object.

    python bench/feature_probe.py --checkpoint demo/assets/train/best --data demo/assets/prepared
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench_common import emit, machine
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cris_model.backbone import tokenize
from cris_model.checkpoint import load_checkpoint
from cris_model.data.dataset import RefDataset, collate
from cris_model.data.synth_grammar import SHAPES
from cris_model.imaging import normalize
from cris_model.model import CRIS

IMAGE_KEYS = ("img_c3", "img_c4", "img_pool")  # present for ResNet and ViT backbones


def probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
          val_y: np.ndarray) -> dict[str, Any]:
    """Fit a logistic regression on standardised train features, score it on both; chance =
    val's majority share."""
    chance = Counter(val_y.tolist()).most_common(1)[0][1] / len(val_y)
    if len(set(train_y.tolist())) < 2:
        return {"train": 1.0, "val": chance, "chance": chance, "n_train": len(train_y),
                "n_val": len(val_y), "note": "one class in train: nothing to learn"}
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    clf.fit(train_x, train_y)
    return {"train": round(float(clf.score(train_x, train_y)), 4),
            "val": round(float(clf.score(val_x, val_y)), 4), "chance": round(chance, 4),
            "n_train": len(train_y), "n_val": len(val_y)}


def masked_means(model: CRIS, data: Path, split: str, limit: int,
                 batch: int = 32) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per referred object (up to `limit`): image features averaged inside its mask, and its
    category id; objects without a single category (no-target, multi-target) are skipped."""
    ds = RefDataset(data, split, model.config.input_size, model.config.word_len, sample="ref")
    keep = [i for i in range(len(ds))
            if len(ds.records[int(ds.groups[i][0])]["ann_ids"]) == 1][:limit]
    pooled: dict[str, list[np.ndarray]] = {k: [] for k in IMAGE_KEYS}
    labels: list[int] = []
    for start in range(0, len(keep), batch):
        items = collate([ds[i] for i in keep[start:start + batch]])
        mask = items["mask"][:, None]
        with torch.no_grad():
            feats = model.encode_image(normalize(items["image"]))
        for key in IMAGE_KEYS:
            area = F.interpolate(mask, size=feats[key].shape[-2:], mode="area")
            mean = (feats[key] * area).sum((2, 3)) / area.sum((2, 3)).clamp_min(1e-6)
            pooled[key].append(mean.numpy())
        labels += [int(ds.records[int(i)]["category_id"]) for i in items["index"]]
    return {k: np.concatenate(v) for k, v in pooled.items()}, np.asarray(labels)


def named_words(model: CRIS, data: Path, split: str,
                words: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Sentence embeddings of the split's phrases that name exactly one of `words`, and which."""
    ds = RefDataset(data, split, model.config.input_size, model.config.word_len,
                    sample="sentence")
    rows = [(s, [w for w in words if w in s.split()]) for s in ds.rows["sentence"]]
    named = [(s, found[0]) for s, found in rows if len(found) == 1]
    if not named:
        raise ValueError(f"{data}: no {split} phrase names one of {', '.join(words)}")
    with torch.no_grad():
        sentence = model.encode_text(tokenize([s for s, _ in named], model.config.word_len))
    return sentence["sentence"].numpy(), np.asarray([words.index(w) for _, w in named])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    ap.add_argument("--data", type=Path, required=True, help="prepared folder")
    ap.add_argument("--words", default=",".join(SHAPES),
                    help="comma-separated words the text probe tells apart (default: the "
                         "synthetic shapes)")
    ap.add_argument("--limit", type=int, default=2000, help="referred objects per split")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    train_x, train_y = masked_means(model, args.data, "train", args.limit)
    val_x, val_y = masked_means(model, args.data, "val", args.limit)
    words = tuple(w for w in args.words.split(",") if w)
    text_train = named_words(model, args.data, "train", words)
    text_val = named_words(model, args.data, "val", words)
    result = {
        "bench": "feature_probe", "machine": machine(), "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "image_category": {k: probe(train_x[k], train_y, val_x[k], val_y) for k in IMAGE_KEYS},
        "sentence_names": {"words": list(words), **probe(*text_train, *text_val)},
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"feature_probe: {e}")
