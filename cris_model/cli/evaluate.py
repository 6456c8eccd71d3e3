"""`cris evaluate` (per-split metrics, CSV, gallery) and `cris features cache` (CLIP cache)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cris_model.cli.common import add_params, print_json


def _evaluate(args: argparse.Namespace) -> int:
    from cris_model.eval_config import EvalConfig
    from cris_model.evaluate import evaluate_split
    from cris_model.params import load_params, section

    settings = (EvalConfig.from_params(section(load_params(args.params, args.overrides), "eval"))
                if args.params or args.overrides else EvalConfig())
    threshold = settings.threshold if args.threshold is None else args.threshold
    precision = args.precision or settings.precision
    result = evaluate_split(
        Path(args.checkpoint), Path(args.data), args.split, Path(args.out),
        threshold=threshold, device=args.device, batch_size=args.batch_size,
        run_id=args.run_id, tracking_uri=args.tracking_uri, gallery_size=args.gallery_size,
        precision=precision,
    )
    print_json(result)
    return 0


def _cache(args: argparse.Namespace) -> int:
    from cris_model.features import cache_features
    from cris_model.params import load_params

    params = load_params(args.params, args.overrides)
    print_json(cache_features(params, Path(args.data), args.split, Path(args.out),
                              dtype=args.dtype, device=args.device, batch_size=args.batch_size))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `evaluate` verb and the `features` verb group."""
    p = sub.add_parser("evaluate", help="metrics, per-sentence CSV and gallery of one split")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. O/best)")
    p.add_argument("--data", required=True, help="prepared folder (`cris data prepare`)")
    p.add_argument("--split", required=True, help="manifest split, e.g. val, testA")
    p.add_argument("--out", required=True, help="folder for metrics.json, sentences.csv, "
                                                "gallery.png")
    add_params(p)
    p.add_argument("--threshold", type=float, default=None,
                   help="sigmoid threshold (default: eval.threshold, else the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="fp32 (exact) or bf16 autocast (faster on a GPU); default: "
                        "eval.precision, else fp32")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per head call")
    p.add_argument("--gallery-size", type=int, default=4, help="cases per gallery row (0: none)")
    p.add_argument("--run-id", default=None, help="MLflow run to log metrics and files to")
    p.add_argument("--tracking-uri", default="",
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")
    p.set_defaults(func=_evaluate)

    group = sub.add_parser("features", help="CLIP feature cache")
    gsub = group.add_subparsers(dest="features_cmd", required=True)
    p = gsub.add_parser("cache", help="run the frozen CLIP encoders over a split, store shards")
    add_params(p)
    p.add_argument("--data", required=True, help="prepared folder (`cris data prepare`)")
    p.add_argument("--split", required=True, help="manifest split to cache, e.g. train")
    p.add_argument("--out", required=True, help="cache root; writes <out>/<key>/<split>/")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="stored feature precision")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.set_defaults(func=_cache)
