"""`cris model ...`: inspect presets and checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from cris_model.cli.common import print_json


def _summary(args: argparse.Namespace) -> int:
    from cris_model.model import summarize

    print_json(summarize(args.preset, word_len=args.word_len, input_size=args.input_size))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from cris_model.config import get_preset, list_presets

    print_json({name: get_preset(name).to_dict() for name in list_presets()})
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from cris_model.checkpoint import read_checkpoint_meta

    print_json(read_checkpoint_meta(Path(args.checkpoint)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `model` verb group."""
    group = sub.add_parser("model", help="inspect model presets and checkpoints")
    gsub = group.add_subparsers(dest="model_cmd", required=True)
    p = gsub.add_parser("summary", help="parameter count and output shape of a preset (JSON)")
    p.add_argument("--preset", required=True)
    p.add_argument("--word-len", type=int, default=None, help="text context (default: preset's)")
    p.add_argument("--input-size", type=int, default=416)
    p.set_defaults(func=_summary)

    p = gsub.add_parser("presets", help="every shipped preset and its config (JSON)")
    p.set_defaults(func=_presets)

    p = gsub.add_parser("inspect", help="config, tokenizer and metrics of a checkpoint (JSON)")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.set_defaults(func=_inspect)
