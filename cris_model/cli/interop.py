"""`cris import reference`, `cris convert-clip` and `cris export`: files in and out of CRIS.

Each prints its summary as JSON on stdout; a refused file is one `cris: error:` line naming
the file and the problem, exit 1, and nothing written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cris_model.cli.common import print_json


def _import_reference(args: argparse.Namespace) -> int:
    from cris_model.interop.reference import import_reference

    config = Path(args.config) if args.config else None
    print_json(import_reference(Path(args.checkpoint), Path(args.out), config))
    return 0


def _convert_clip(args: argparse.Namespace) -> int:
    from cris_model.interop.clip_archive import convert_clip_archive

    print_json(convert_clip_archive(Path(args.archive), Path(args.out), args.preset))
    return 0


def _export(args: argparse.Namespace) -> int:
    from cris_model.interop.onnx_export import export_checkpoint

    print_json(export_checkpoint(Path(args.checkpoint), Path(args.out), split=args.split,
                                 check_batches=args.check_batches, tolerance=args.tolerance))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `import`, `convert-clip` and `export` verbs."""
    group = sub.add_parser("import", help="bring a model from another codebase in")
    gsub = group.add_subparsers(dest="import_cmd", required=True)
    p = gsub.add_parser("reference", help="a CRIS.pytorch train.py checkpoint -> a checkpoint "
                                          "directory")
    p.add_argument("--checkpoint", required=True, help="best_model.pth / last_model.pth")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--config", default=None,
                   help="the reference's YAML config (TRAIN.word_len, input_size, num_head); "
                        "default 17 tokens, 416 px, 8 heads")
    p.set_defaults(func=_import_reference)

    p = sub.add_parser("convert-clip", help="an OpenAI CLIP TorchScript archive -> safetensors "
                                            "for model.pretrained (no code run)")
    p.add_argument("archive", help="RN50.pt, RN101.pt, ViT-B-16.pt, ...")
    p.add_argument("--out", required=True, help="safetensors file to write")
    p.add_argument("--preset", default=None,
                   help="preset whose CLIP the weights must fit (default: cris_r50, cris_r101 "
                        "or cris_vit_b16, whichever fits)")
    p.set_defaults(func=_convert_clip)

    p = sub.add_parser("export", help="a checkpoint as ONNX, checked against PyTorch")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--format", required=True, choices=["onnx"])
    p.add_argument("--out", required=True, help="model.onnx (with --split: the stem of two files)")
    p.add_argument("--split", action="store_true",
                   help="two graphs: <stem>.image_encoder.onnx (once per image) and "
                        "<stem>.phrase_head.onnx (per phrase batch)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest accepted |onnxruntime - PyTorch| logit difference, times "
                        "max(1, largest |logit|) (default 1e-4)")
    p.add_argument("--check-batches", type=int, nargs="+", default=[1, 3], metavar="B",
                   help="batch sizes checked with onnxruntime (default 1 3)")
    p.set_defaults(func=_export)
