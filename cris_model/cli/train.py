"""`cris train`: train CRIS on a prepared folder; writes OUT/last and OUT/best."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

from cris_model.cli.common import add_params, print_json


def _train(args: argparse.Namespace) -> int:
    from cris_model.params import load_params
    from cris_model.pipes_report import report_training
    from cris_model.training.loop import train

    params = load_params(args.params, args.overrides)
    if args.features:
        params.setdefault("train", {}).update(features_dir=args.features, freeze_backbone=True)
    result = train(params, Path(args.data), Path(args.out), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print_json(asdict(result))
        report_training(asdict(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `train` verb (run it under `torchrun` for several processes)."""
    p = sub.add_parser("train", help="train on a prepared folder; writes OUT/last and OUT/best")
    add_params(p)
    p.add_argument("--data", required=True, help="folder written by `cris data prepare`")
    p.add_argument("--out", required=True, help="output folder for the checkpoint directories")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--features", default=None,
                   help="CLIP feature cache folder (sets train.features_dir and "
                        "train.freeze_backbone=true)")
    p.set_defaults(func=_train)
