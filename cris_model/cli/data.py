"""`cris data ...`: synthesise, fetch, prepare and validate referring datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

from cris_model.cli.common import print_json


def _prepare(args: argparse.Namespace) -> int:
    from cris_model.data.manifest import prepare_dataset

    summary = prepare_dataset(
        Path(args.root), args.dataset, args.split_by, Path(args.out),
        image_dir=Path(args.image_dir) if args.image_dir else None,
    )
    print_json(summary)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from cris_model.data.synth import generate

    print_json(generate(Path(args.out), images=args.images, seed=args.seed))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from cris_model.data.fetch import FetchConfig, RetryPolicy, fetch

    config = FetchConfig(
        sha256=args.sha256, endpoint_url=args.endpoint_url,
        retry=RetryPolicy(retries=args.retries, timeout_s=args.timeout),
    )
    print_json(fetch(args.source, Path(args.out), config))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from data_checks import validate_prepared

    report = validate_prepared(Path(args.data))
    print(report.render())
    return 0 if report.success else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `data` verb group."""
    group = sub.add_parser("data", help="datasets: synth, fetch, prepare, validate")
    gsub = group.add_subparsers(dest="data_cmd", required=True)

    p = gsub.add_parser("prepare", help="original refer files -> one Parquet manifest per split")
    p.add_argument("--root", required=True, help="data root in the original refer layout")
    p.add_argument("--dataset", required=True,
                   choices=["refcoco", "refcoco+", "refcocog", "grefcoco"])
    p.add_argument("--split-by", required=True, choices=["unc", "umd", "google"])
    p.add_argument("--out", required=True, help="output folder for <split>.parquet")
    p.add_argument("--image-dir", default=None,
                   help="images folder (default: <root>/images/mscoco/images/train2014)")
    p.set_defaults(func=_prepare)

    p = gsub.add_parser("synth", help="write a procedural referring dataset in the refer layout")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)

    p = gsub.add_parser("fetch", help="copy a dataset from a folder, s3:// or https:// archive")
    p.add_argument("--source", required=True,
                   help="a folder or s3://bucket/prefix with a SHA256SUMS, or an http(s) archive")
    p.add_argument("--out", required=True, help="folder to create (staged in <out>.partial/)")
    p.add_argument("--sha256", default=None, metavar="HEX",
                   help="expected SHA-256 of an http(s) archive (default: read <url>.sha256)")
    p.add_argument("--endpoint-url", default=None, metavar="URL",
                   help="S3-compatible endpoint (default: $CRIS_S3_ENDPOINT_URL)")
    p.add_argument("--retries", type=int, default=4,
                   help="retries of a failing transfer, with exponential backoff (default 4)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="socket timeout of one request in seconds (default 60)")
    p.set_defaults(func=_fetch)

    p = gsub.add_parser("validate", help="great-expectations checks over a prepared folder")
    p.add_argument("data", help="folder written by `cris data prepare`")
    p.set_defaults(func=_validate)
