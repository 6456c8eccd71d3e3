"""`cris predict`: segment one image for one or more referring expressions.

With a single `--text` the mask is written to `--out` (and the overlay to `--overlay`).
With N > 1 texts, file i (0-based, in the order given) gets `_i` before the suffix:
`--out mask.png` writes `mask_0.png`, `mask_1.png`, ...; overlays are named the same way.
Masks are 8-bit PNGs with values 0/255 at the input image's size. A JSON summary (one
entry per text: text, mask path, overlay path, mask area fraction) goes to stdout.
The model is a checkpoint directory (`--checkpoint`) or a registered MLflow model
(`--model-uri models:/cris@champion`), downloaded to a temporary folder and loaded the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cris_model.cli.common import add_model_options, print_json


def _numbered(path: Path, index: int, total: int) -> Path:
    """`path` itself for a single output, else `<stem>_<index><suffix>`."""
    if total == 1:
        return path
    return path.with_name(f"{path.stem}_{index}{path.suffix or '.png'}")


def _predict(args: argparse.Namespace) -> int:
    from cris_model.gallery import mask_image, overlay_mask, save_png
    from cris_model.imaging import load_image
    from cris_model.predict import Predictor, check_texts

    texts = check_texts(args.text)
    image = load_image(args.image)
    if args.model_uri:
        predictor = Predictor.from_registry(args.model_uri, args.tracking_uri,
                                            device=args.device, threshold=args.threshold)
    else:
        predictor = Predictor.from_checkpoint(
            args.checkpoint, device=args.device, threshold=args.threshold
        )
    masks = predictor.segment(predictor.embed(image), texts)
    out, overlay = Path(args.out), Path(args.overlay) if args.overlay else None
    summary = []
    for i, (text, mask) in enumerate(zip(texts, masks, strict=True)):
        mask_path = save_png(mask_image(mask), _numbered(out, i, len(texts)))
        entry = {"text": text, "mask": str(mask_path), "area": float(mask.mean())}
        if overlay is not None:
            ov = overlay_mask(image, mask, caption=text)
            entry["overlay"] = str(save_png(ov, _numbered(overlay, i, len(texts))))
        summary.append(entry)
    print_json(summary)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `predict` verb."""
    p = sub.add_parser("predict", help="mask PNG(s) for referring expressions on one image")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory (cris train output)")
    source.add_argument("--model-uri", default=None,
                        help="registered MLflow model, e.g. models:/cris@champion")
    p.add_argument("--image", required=True, help="input image (JPEG, PNG, ...)")
    p.add_argument("--text", action="append", required=True,
                   help="referring expression (repeatable: one mask per text)")
    p.add_argument("--out", required=True,
                   help="mask PNG path; with several --text, <stem>_<i>.png per text")
    p.add_argument("--overlay", default=None,
                   help="also write the mask tinted over the image with the phrase as caption")
    add_model_options(p)
    p.set_defaults(func=_predict)
