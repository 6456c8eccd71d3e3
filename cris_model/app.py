"""The try-it page (`cris app`): phrases on your own image, one model or two side by side.

A Gradio page over `Predictor`. The user uploads an image (or picks one of the prepared
dataset's, which comes with its referring sentences) and types phrases, one per line. Each
model encodes the image once (`Predictor.embed`), scores every phrase against that encoding
(`Predictor.segment`), and shows each mask tinted over the image with its phrase
(`gallery.overlay_mask`), its area (fraction and pixels) and the time taken. With a second
model, its overlays stand beside the first's, each column headed by the model's registry
version, aliases and val mIoU.

Uploads are decoded by `imaging.decode_image` (its pixel limit and mode policy) and phrases
are checked by `predict.check_texts` (the serving pyfunc's rule), so bad input becomes a
message on the page and the server goes on. Gradio keeps uploads and the example images in a
temporary folder (GRADIO_TEMP_DIR) that is removed when the server stops (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cris_model.backbone import token_count
from cris_model.checkpoint import read_checkpoint_meta
from cris_model.data.dataset import open_split, read_image
from cris_model.gallery import overlay_mask, save_png
from cris_model.imaging import decode_image
from cris_model.predict import Predictor, check_texts
from cris_model.registry import model_version

if TYPE_CHECKING:
    import gradio as gr

MAX_PHRASES = 8  # phrases answered per request (one overlay each per model)
MAX_UPLOAD = "32mb"  # largest file Gradio accepts; imaging refuses too many pixels
DISPLAY_SIDE = 480  # longest side, in pixels, of an overlay shown on the page
EXAMPLE_IMAGES = 6  # images of the prepared split offered as examples
CAPTION_CHARS = 60  # characters of a phrase kept in captions and tables
# Tint of phrase i's mask (the same in every column), none of them a colour of the synthetic
# shapes, so that a mask over a red square still shows.
PHRASE_COLOURS = ((255, 0, 200), (0, 220, 230), (170, 255, 0), (255, 255, 255),
                  (0, 0, 0), (255, 150, 200), (120, 120, 255), (255, 60, 60))
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+\-.!|~])")


@dataclass(frozen=True)
class ServedModel:
    """One model on the page: its predictor and the words that say which model it is."""

    predictor: Predictor
    title: str  # e.g. "cris v3 (champion)"
    details: str  # e.g. "val mIoU 0.4070 · models:/cris@champion"


@dataclass(frozen=True)
class Answer:
    """One model's answer to one request: overlays with captions, areas and timings."""

    overlays: list[tuple[Image.Image, str]]  # (overlay at display size, caption) per phrase
    areas: list[tuple[str, float, int]]  # (phrase, fraction of the image, pixels) per phrase
    encode_s: float  # seconds spent encoding the image, once
    phrases_s: float  # seconds spent scoring every phrase against that encoding


def _miou(value: Any) -> str:
    """A val mIoU as the page shows it, "unknown" when the model carries none."""
    return "val mIoU unknown" if value is None else f"val mIoU {float(value):.4f}"


def load_model(
    source: str | Path, tracking_uri: str = "", device: str = "cpu",
    threshold: float | None = None,
) -> ServedModel:
    """A checkpoint directory (Path) or a models:/ URI (str) -> ServedModel.

    A URI is resolved once to its version, and that version's weights are loaded, so the
    page describes exactly the weights it serves even if an alias moves later.
    """
    if isinstance(source, Path):
        metrics = read_checkpoint_meta(source)["metrics"]
        predictor = Predictor.from_checkpoint(source, device=device, threshold=threshold)
        return ServedModel(predictor, f"checkpoint {source.name}",
                           f"{_miou(metrics.get('mIoU'))} · {source}")
    info = model_version(source, tracking_uri)
    pinned = f"models:/{info['model_name']}/{info['version']}"
    predictor = Predictor.from_registry(pinned, tracking_uri, device=device, threshold=threshold)
    aliases = ", ".join(info["aliases"]) or "no alias"
    return ServedModel(predictor, f"{info['model_name']} v{info['version']} ({aliases})",
                       f"{_miou(info['mIoU'])} · {source}")


def load_models(
    sources: Sequence[str | Path], tracking_uri: str = "", device: str = "cpu",
    threshold: float | None = None,
) -> list[ServedModel]:
    """`load_model` for each source in order, skipping a models:/ URI that names a version
    already loaded (champion and challenger on one version make one column, not two)."""
    served, seen = [], set()
    for source in sources:
        if isinstance(source, Path):
            key = str(source)
        else:
            info = model_version(source, tracking_uri)
            key = f"{info['model_name']}/{info['version']}"
        if key not in seen:
            seen.add(key)
            served.append(load_model(source, tracking_uri, device=device, threshold=threshold))
    return served


def read_upload(path: str | None) -> Image.Image:
    """An uploaded file -> 8-bit RGB image by imaging's policy; ValueError naming the file
    (its name only, not the temporary folder)."""
    if not path:
        raise ValueError("no image: upload one or pick an example")
    name = Path(path).name
    try:
        with Path(path).open("rb") as f:
            return decode_image(f, name)
    except OSError as e:
        raise ValueError(f"{name}: the upload cannot be read ({e.strerror})") from e


def read_phrases(text: str | None) -> list[str]:
    """Phrases typed one per line -> checked, stripped phrases; blank lines between phrases
    are skipped. ValueError when none is left or there are more than MAX_PHRASES."""
    lines = [line for line in (text or "").splitlines() if line.strip()] or [text or ""]
    if len(lines) > MAX_PHRASES:
        raise ValueError(f"{len(lines)} phrases: at most {MAX_PHRASES} at a time")
    return check_texts(lines)


def _short(phrase: str) -> str:
    """A phrase cut to CAPTION_CHARS for captions and tables (the model gets it whole)."""
    return phrase if len(phrase) <= CAPTION_CHARS else phrase[: CAPTION_CHARS - 1] + "…"


def _display(image: Image.Image) -> Image.Image:
    """The image scaled (up or down) so that its longest side is DISPLAY_SIDE."""
    scale = DISPLAY_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def answer(model: ServedModel, image: Image.Image, phrases: Sequence[str]) -> Answer:
    """Encode `image` once and segment every phrase; overlays are drawn at display size."""
    start = time.perf_counter()
    embedding = model.predictor.embed(image)
    encoded = time.perf_counter()
    masks = model.predictor.segment(embedding, list(phrases))
    done = time.perf_counter()
    shown = _display(image)
    overlays, areas = [], []
    for i, (phrase, mask) in enumerate(zip(phrases, masks, strict=True)):
        small = np.asarray(Image.fromarray(mask).resize(shown.size, Image.Resampling.NEAREST))
        fraction, pixels = float(mask.mean()), int(mask.sum())
        colour = PHRASE_COLOURS[i % len(PHRASE_COLOURS)]
        overlays.append((overlay_mask(shown, small, caption=_short(phrase), colour=colour),
                         f"{_short(phrase)}: {fraction:.1%} ({pixels:,} px)"))
        areas.append((phrase, fraction, pixels))
    return Answer(overlays, areas, encoded - start, done - encoded)


def _md(text: str) -> str:
    """User text made literal inside Markdown."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def _report(model: ServedModel, result: Answer) -> str:
    """Markdown under a model's overlays: timings, then phrase, area and pixels per phrase,
    and a note for each phrase longer than the model reads."""
    n = len(result.areas)
    lines = [f"Image encoded once in {result.encode_s * 1e3:.0f} ms; {n} phrase"
             f"{'s' if n != 1 else ''} in {result.phrases_s * 1e3:.0f} ms.", "",
             "| phrase | area | pixels |", "|---|---|---|"]
    lines += [f"| {_md(_short(p))} | {f:.1%} | {px:,} |" for p, f, px in result.areas]
    keep = model.predictor.model.config.word_len - 2
    for i, (phrase, _, _) in enumerate(result.areas):
        tokens = token_count(phrase)
        if tokens > keep:
            lines.append(f"\nPhrase {i + 1} has {tokens} tokens; the model reads only the "
                         f"first {keep}.")
    return "\n".join(lines)


def respond(models: Sequence[ServedModel], path: str | None, text: str | None) -> list[Any]:
    """The page's answer: [status, one gallery value per model, one report per model]; bad
    input gives a status that says what is wrong, and empty galleries."""
    try:
        image = read_upload(path)
        phrases = read_phrases(text)
    except ValueError as e:
        return [f"**Cannot segment:** {_md(str(e))}", *([] for _ in models),
                *("" for _ in models)]
    results = [answer(model, image, phrases) for model in models]
    status = f"{len(phrases)} phrase(s) on a {image.width}x{image.height} image."
    return [status, *(r.overlays for r in results),
            *(_report(m, r) for m, r in zip(models, results, strict=True))]


def preview(path: str | None) -> tuple[Image.Image | None, str]:
    """(the decoded upload for the input view, status); a bad file gives a message."""
    if not path:
        return None, ""
    try:
        return read_upload(path), ""
    except ValueError as e:
        return None, f"**Cannot read the image:** {_md(str(e))}"


def dataset_examples(data_dir: Path, split: str, dest: Path,
                     count: int = EXAMPLE_IMAGES) -> list[list[str]]:
    """[image PNG, its sentences one per line] for the first `count` images of a prepared
    split, decoded the dataset's way (`dataset.read_image`) and written into `dest`."""
    rows, image_dir = open_split(data_dir, split)
    examples: list[list[str]] = []
    for image_id, group in rows.groupby("image_id", sort=False):
        if len(examples) == count:
            break
        path = save_png(read_image(image_dir, group.iloc[0]), dest / f"{split}-{image_id}.png")
        sentences = list(dict.fromkeys(str(s) for s in group["sentence"]))[:MAX_PHRASES]
        examples.append([str(path), "\n".join(sentences)])
    return examples


def build_page(models: Sequence[ServedModel], examples: list[list[str]]) -> gr.Blocks:
    """The Gradio page: upload, phrases and examples on the left, one column per model."""
    import gradio as gr

    with gr.Blocks(title="CRIS: try it", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as page:
        gr.Markdown("# CRIS: try it\nUpload an image or pick an example, type one phrase per "
                    "line, and press **Segment**.")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                upload = gr.File(label="Image", type="filepath", elem_id="image-file")
                shown = gr.Image(label="Input", interactive=False, height=240,
                                 elem_id="input-view")
                phrases = gr.Textbox(label=f"Phrases, one per line (at most {MAX_PHRASES})",
                                     lines=4, max_lines=8, elem_id="phrases")
                run = gr.Button("Segment", variant="primary", elem_id="segment")
                if examples:
                    gr.Examples(examples, [upload, phrases], label="Images of the dataset",
                                cache_examples=False)
            with gr.Column(scale=3):
                status = gr.Markdown(elem_id="status")
                galleries, reports = [], []
                with gr.Row():
                    for i, model in enumerate(models):
                        with gr.Column(elem_classes=["model-column"], elem_id=f"model-{i}"):
                            gr.Markdown(f"### {_md(model.title)}\n{_md(model.details)}")
                            galleries.append(gr.Gallery(
                                label="Overlays", columns=2, height="auto", format="png",
                                object_fit="contain", elem_id=f"overlays-{i}"))
                            reports.append(gr.Markdown(elem_id=f"report-{i}"))
        # Both write the status line: one queue, so a click right after an upload is answered
        # after the upload's preview, never overwritten by it.
        upload.change(preview, upload, [shown, status], concurrency_id="page",
                      concurrency_limit=1)
        run.click(partial(respond, models), [upload, phrases], [status, *galleries, *reports],
                  concurrency_id="page", concurrency_limit=1)
    return page


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: stop like Ctrl-C, so that Gradio closes and the temp folder goes."""
    raise KeyboardInterrupt


def serve(models: Sequence[ServedModel], host: str = "127.0.0.1", port: int = 7860,
          data_dir: Path | None = None, split: str = "val") -> None:
    """Run the page on host:port until Ctrl-C or SIGTERM. Uploads and examples live in a
    temporary folder (GRADIO_TEMP_DIR) that is removed on the way out."""
    with tempfile.TemporaryDirectory(prefix="cris-app-") as tmp:
        # Gradio reads both when it is imported and when it stores a file.
        os.environ["GRADIO_TEMP_DIR"] = tmp
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        examples = dataset_examples(data_dir, split, Path(tmp) / "examples") if data_dir else []
        page = build_page(models, examples)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            page.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD,
                        ssr_mode=False, mcp_server=False, run_history=False)
        finally:
            signal.signal(signal.SIGTERM, previous)
            page.close()
