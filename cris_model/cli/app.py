"""`cris app`: the try-it page in the browser (Gradio): phrases on your own image or one of the
dataset's, with one model, or two side by side (`--compare`).

The model is a registered MLflow model (`--model-uri`, default models:/cris@champion) or a
checkpoint directory (`--checkpoint`); a models:/ URI is resolved to its version once, at start.
The page listens on 127.0.0.1:7860 unless `--host` / `--port` say otherwise and runs until
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cris_model.cli.common import add_model_options

DEFAULT_MODEL = "models:/cris@champion"  # what the page serves when no model is named


def _app(args: argparse.Namespace) -> int:
    from cris_model.app import load_models, serve

    first = Path(args.checkpoint) if args.checkpoint else args.model_uri
    sources = [first, args.compare] if args.compare else [first]
    models = load_models(sources, args.tracking_uri, device=args.device,
                         threshold=args.threshold)
    if len(models) < len(sources):
        print(f"cris app: {args.compare} is the version {first} names; shown once",
              file=sys.stderr)
    serve(models, host=args.host, port=args.port,
          data_dir=Path(args.data) if args.data else None, split=args.split)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `app` verb."""
    p = sub.add_parser("app", help="the try-it page: phrases on an image in the browser, "
                                   "optionally champion beside challenger")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model-uri", default=DEFAULT_MODEL,
                        help=f"registered MLflow model (default: {DEFAULT_MODEL})")
    source.add_argument("--checkpoint", default=None, help="checkpoint directory instead")
    p.add_argument("--compare", default=None, metavar="MODEL_URI",
                   help="a second registered model shown beside the first, "
                        "e.g. models:/cris@challenger")
    p.add_argument("--data", default=None,
                   help="prepared folder (cris data prepare): its images and sentences "
                        "become the page's examples")
    p.add_argument("--split", default="val", help="split of --data the examples come from")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    add_model_options(p)
    p.set_defaults(func=_app)
