"""`cris model ...`: inspect presets."""

from __future__ import annotations

import argparse

from cris_model.cli.common import print_json


def _summary(args: argparse.Namespace) -> int:
    from cris_model.model import summarize

    print_json(summarize(args.preset, word_len=args.word_len, input_size=args.input_size))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `model` verb group."""
    group = sub.add_parser("model", help="inspect model presets")
    gsub = group.add_subparsers(dest="model_cmd", required=True)
    p = gsub.add_parser("summary", help="parameter count and output shape of a preset (JSON)")
    p.add_argument("--preset", required=True)
    p.add_argument("--word-len", type=int, default=None, help="text context (default: preset's)")
    p.add_argument("--input-size", type=int, default=416)
    p.set_defaults(func=_summary)
