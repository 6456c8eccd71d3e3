"""The `cris` command line: one verb per pipeline stage, each a thin call into the library.

Each verb group lives in its own module here and exposes `register(subparsers)`.
Every verb that takes parameters accepts `--params FILE` and repeated `--set key=value`.
Bad input surfaces as one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cris_model.cli import app, data, evaluate, interop, model, predict, registry, train


def build_parser() -> argparse.ArgumentParser:
    """The full `cris` argument parser."""
    parser = argparse.ArgumentParser(prog="cris", description="CRIS referring segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (model, data, predict, train, evaluate, registry, interop, app):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cris` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"cris: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cris: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
