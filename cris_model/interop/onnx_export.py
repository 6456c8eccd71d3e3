"""`cris export --format onnx`: a checkpoint as an ONNX graph, checked against PyTorch.

The whole model: inputs `image` Bx3xHxW float32 (CLIP-normalised, H = W = the config's
input_size) and `tokens` BxL int64 (L = word_len), output `logits` Bx1x(H/s)x(W/s); the
batch is dynamic. With `split`, two graphs serve many phrases per image: `image_encoder`
(image 1x3xHxW -> CLIP's feature maps, run once) and `phrase_head` (those maps + tokens
NxL -> logits Nx1x(H/s)x(W/s), N dynamic); s is the config's mask_stride.

The exporter is torch.onnx's TorchScript tracer (`dynamo=False`: the dynamo exporter needs
onnxscript, which this project does not install). Before a file is kept, onnxruntime runs
it on the CPU at every batch size of `check_batches`, and the largest absolute difference
from PyTorch's logits must be at most `tolerance` x max(1, the largest |logit|): float32
kernels that add in another order differ in proportion to the values (RN50 at 416 px,
logits up to 32, differed by 1.3e-4); otherwise RuntimeError and no file.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cris_model.atomic import staged_file
from cris_model.backbone import tokenize
from cris_model.checkpoint import load_checkpoint
from cris_model.model import CRIS

OPSET = 17  # ONNX opset: MultiheadAttention, LayerNorm and bicubic weights all fit in 17
TOLERANCE = 1e-4  # accepted |onnxruntime - PyTorch|, per unit of the largest |logit| (min 1)
_PHRASES = ("the red circle on the left", "a small square", "the biggest object",
            "green triangle below the blue one")


class _ImageEncoder(nn.Module):
    """image -> CLIP's feature maps, in the model's image_keys order."""

    def __init__(self, model: CRIS) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.model.encode_image(image)
        return tuple(feats[k] for k in self.model.image_keys)


class _PhraseHead(nn.Module):
    """(feature maps of one image, tokens NxL) -> Nx1x(H/4)x(W/4) logits."""

    def __init__(self, model: CRIS) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *maps, tokens = inputs
        feats = dict(zip(self.model.image_keys, maps, strict=True))
        return self.model.head({**feats, **self.model.encode_text(tokens)})


def _inputs(model: CRIS, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random normalised image batch and real phrases' tokens of that batch size."""
    size = model.config.input_size
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, size, size, generator=generator)
    phrases = [_PHRASES[i % len(_PHRASES)] for i in range(batch)]
    return image, tokenize(phrases, model.config.word_len)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path,
            names: tuple[Sequence[str], Sequence[str]], dynamic: dict[str, dict[int, str]],
            opset: int) -> None:
    """torch.onnx.export of `module` at `args` into `path` (tracer warnings silenced: the
    sizes it freezes are the fixed input side and text length)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(warnings.catch_warnings())
        stack.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
        warnings.simplefilter("ignore")
        # MultiheadAttention's fused inference kernel has no ONNX form; its plain path does
        torch.backends.mha.set_fastpath_enabled(False)
        torch.onnx.export(module, args, str(path), input_names=list(names[0]),
                          output_names=list(names[1]), dynamic_axes=dynamic,
                          opset_version=opset, dynamo=False)


def _name_dims(path: Path, shapes: dict[str, list[Any]]) -> None:
    """Write the known size (int) or batch name (str) of each named input and output into
    the graph's declared shapes: the tracer leaves the logits' sides symbolic."""
    import onnx

    model = onnx.load(str(path))
    named = [v for v in (*model.graph.input, *model.graph.output) if v.name in shapes]
    for value in named:
        for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name], strict=True):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    onnx.save(model, str(path))


def _session(path: Path) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


Measured = dict[str, tuple[float, float]]  # batch -> (max |ORT - PyTorch|, max |logit|)


def _difference(got: np.ndarray, want: torch.Tensor) -> tuple[float, float]:
    """(largest |got - want|, largest |want|) of one batch of logits."""
    if tuple(got.shape) != tuple(want.shape):
        raise RuntimeError(f"ONNX logits have shape {list(got.shape)}, PyTorch "
                           f"{list(want.shape)}")
    return float(np.abs(got - want.numpy()).max()), float(want.abs().max())


def _check_whole(model: CRIS, path: Path, batches: Sequence[int]) -> Measured:
    """Per batch size, the whole-model graph's difference from PyTorch and the logit scale."""
    session, measured = _session(path), {}
    for batch in batches:
        image, tokens = _inputs(model, batch, seed=batch)
        with torch.no_grad():
            want = model(image, tokens)
        got = session.run(None, {"image": image.numpy(), "tokens": tokens.numpy()})[0]
        measured[str(batch)] = _difference(got, want)
    return measured


def _check_split(model: CRIS, paths: tuple[Path, Path], batches: Sequence[int]) -> Measured:
    """Per phrase count, image encoder then phrase head on one image against PyTorch."""
    encoder, head, measured = _session(paths[0]), _session(paths[1]), {}
    keys = list(model.image_keys)
    for batch in batches:
        image, tokens = _inputs(model, batch, seed=batch)
        image = image[:1]
        with torch.no_grad():
            want = model(image.expand(batch, -1, -1, -1), tokens)
        maps = encoder.run(None, {"image": image.numpy()})
        got = head.run(None, {**dict(zip(keys, maps, strict=True)), "tokens": tokens.numpy()})
        measured[str(batch)] = _difference(got[0], want)
    return measured


def _within(measured: Measured, tolerance: float, what: str) -> dict[str, Any]:
    """RuntimeError unless every difference is at most tolerance x max(1, |logit| max);
    -> the figures for the summary."""
    diffs = {b: d for b, (d, _) in measured.items()}
    scales = {b: s for b, (_, s) in measured.items()}
    for batch, (diff, scale) in measured.items():
        if not diff <= tolerance * max(1.0, scale):  # also refuses NaN
            raise RuntimeError(
                f"{what}: onnxruntime differs from PyTorch by {diff:.3g} at batch {batch} "
                f"(tolerance {tolerance:g} x max(1, largest |logit| {scale:.3g}); per batch "
                f"{diffs}); nothing written")
    return {"max_abs_diff": diffs, "max_abs_logit": scales}


def split_paths(out: Path) -> tuple[Path, Path]:
    """Where a split export writes: <stem>.image_encoder.onnx and <stem>.phrase_head.onnx."""
    stem = out.name.removesuffix(".onnx")
    return (out.with_name(f"{stem}.image_encoder.onnx"),
            out.with_name(f"{stem}.phrase_head.onnx"))


def _shapes(model: CRIS, batch: str) -> dict[str, Any]:
    size, length = model.config.input_size, model.config.word_len
    return {"image": [batch, 3, size, size], "tokens": [batch, length],
            "logits": [batch, 1, size // model.config.mask_stride,
                       size // model.config.mask_stride]}


def _prepared(model: CRIS) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval mode and one forward pass, which fills the caches (position grids, the bicubic
    matrix) so the tracer records them as constants; -> a batch-2 example to trace with."""
    model.eval()
    example = _inputs(model, 2, seed=0)
    with torch.no_grad():
        model(*example)
    return example


def export_model(model: CRIS, out: Path, *, check_batches: Sequence[int] = (1, 3),
                 tolerance: float = TOLERANCE, opset: int = OPSET) -> dict[str, Any]:
    """Write `model` as one ONNX graph `out` (dynamic batch), kept only if onnxruntime
    matches PyTorch within `tolerance` at each batch of `check_batches`."""
    out = Path(out)
    example = _prepared(model)
    dynamic = {name: {0: "batch"} for name in ("image", "tokens", "logits")}
    start = time.perf_counter()
    with staged_file(out) as tmp:
        _export(model, example, tmp, (("image", "tokens"), ("logits",)), dynamic, opset)
        _name_dims(tmp, _shapes(model, "batch"))
        export_s = time.perf_counter() - start
        figures = _within(_check_whole(model, tmp, check_batches), tolerance, str(out))
        size = tmp.stat().st_size
    return {"files": [str(out)], "bytes": size, "shapes": _shapes(model, "batch"),
            **figures, "export_s": round(export_s, 2),
            "check_s": round(time.perf_counter() - start - export_s, 2)}


def export_split(model: CRIS, out: Path, *, check_batches: Sequence[int] = (1, 3),
                 tolerance: float = TOLERANCE, opset: int = OPSET) -> dict[str, Any]:
    """Write the image encoder and the phrase head as two ONNX graphs (see split_paths),
    kept only if running both in onnxruntime matches PyTorch's whole model per phrase
    count of `check_batches` within `tolerance`."""
    image, tokens = _prepared(model)
    keys = list(model.image_keys)
    # eval wrappers: the exporter puts a module back into the mode it found it in
    encoder, phrase_head = _ImageEncoder(model).eval(), _PhraseHead(model).eval()
    with torch.no_grad():
        maps = encoder(image[:1])
    paths = split_paths(Path(out))
    start = time.perf_counter()
    with staged_file(paths[0]) as enc, staged_file(paths[1]) as head:
        _export(encoder, (image[:1],), enc, (("image",), keys), {}, opset)
        _export(phrase_head, (*maps, tokens), head, ((*keys, "tokens"), ("logits",)),
                {"tokens": {0: "phrases"}, "logits": {0: "phrases"}}, opset)
        _name_dims(head, _shapes(model, "phrases"))
        export_s = time.perf_counter() - start
        figures = _within(_check_split(model, (enc, head), check_batches), tolerance,
                          str(out))
        size = enc.stat().st_size + head.stat().st_size
    shapes = {**_shapes(model, "phrases"), "image": [1, 3, *_shapes(model, "1")["image"][2:]]}
    return {"files": [str(p) for p in paths], "bytes": size, "shapes": shapes,
            "image_features": {k: list(v.shape) for k, v in zip(keys, maps, strict=True)},
            **figures, "export_s": round(export_s, 2),
            "check_s": round(time.perf_counter() - start - export_s, 2)}


def export_checkpoint(checkpoint: Path, out: Path, *, split: bool = False,
                      check_batches: Sequence[int] = (1, 3), tolerance: float = TOLERANCE,
                      opset: int = OPSET) -> dict[str, Any]:
    """Export a checkpoint directory to ONNX (export_model, or export_split with `split`);
    -> the export's summary with checkpoint, format, opset, tolerance and versions."""
    import onnx
    import onnxruntime

    model = load_checkpoint(Path(checkpoint))
    export = export_split if split else export_model
    summary = export(model, Path(out), check_batches=check_batches, tolerance=tolerance,
                     opset=opset)
    return {"checkpoint": str(checkpoint), "format": "onnx", "split": split, "opset": opset,
            "tolerance": tolerance, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, **summary}
