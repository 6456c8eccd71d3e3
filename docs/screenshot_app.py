"""Redraw docs/app.png: the try-it page (`cris app`) after one request, in headless Chromium.

Starts `cris app` on a free loopback port against the given registry (a relative sqlite:///
path is read from the current directory), uploads an image (the first val image of `--data`
with up to two of its sentences, else a drawn red and blue square with two phrases), waits
for the overlays, saves the screenshot and stops the app. Against the demo's champion,
after `make demo`, from the repository root:

    .venv/bin/python docs/screenshot_app.py --tracking-uri sqlite:///demo/mlflow.db \\
        --data demo/assets/prepared --out docs/app.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]  # browser_support, app_support; infra

from app_support import open_page, start_app, submit, wait_overlays  # noqa: E402
from browser_support import chromium  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from cris_model.app import dataset_examples  # noqa: E402
from infra.process import free_port  # noqa: E402

PHRASES = "the red square\nthe blue square on the right"  # used when --data gives none
WINDOW = (1600, 1150)  # browser window (width, height): the page down to the area tables


def _scene(folder: Path) -> Path:
    """A plain test scene: a red square left, a blue one right, on grey."""
    image = Image.new("RGB", (128, 96), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((16, 40, 44, 68), fill=(210, 40, 40))
    draw.rectangle((80, 20, 112, 52), fill=(45, 85, 215))
    image.save(folder / "scene.png")
    return folder / "scene.png"


def main(argv: list[str] | None = None) -> int:
    """Parse the options, take the screenshot; 0 when it is written."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True, help="MLflow registry, e.g. sqlite:///...")
    p.add_argument("--model-uri", default="models:/cris@champion")
    p.add_argument("--compare", default=None, help="a second model shown beside the first")
    p.add_argument("--data", default=None, help="prepared folder: examples and the image")
    p.add_argument("--threshold", default=None, help="sigmoid threshold (default: the model's)")
    p.add_argument("--out", default=str(REPO / "docs" / "app.png"))
    args = p.parse_args(argv)
    extra = [*(["--compare", args.compare] if args.compare else []),
             *(["--data", str(Path(args.data).resolve())] if args.data else []),
             *(["--threshold", args.threshold] if args.threshold else [])]
    with tempfile.TemporaryDirectory(prefix="cris-shot-") as tmp:
        folder = Path(tmp)
        if args.data:
            image, phrases = dataset_examples(Path(args.data), "val", folder, count=1)[0]
            image_path, text = Path(image), "\n".join(phrases.splitlines()[:2])
        else:
            image_path, text = _scene(folder), PHRASES
        port = free_port()
        app = start_app(["--model-uri", args.model_uri, "--tracking-uri", args.tracking_uri,
                         *extra], port=port, cwd=Path.cwd(), log=folder / "app.log")
        try:
            with chromium() as driver:
                driver.set_window_size(*WINDOW)
                open_page(driver, f"http://127.0.0.1:{port}/")
                submit(driver, image_path, text)
                wait_overlays(driver, len(text.splitlines()), 2 if args.compare else 1)
                driver.save_screenshot(args.out)
        finally:
            app.stop()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
