"""Probing image files: does each exist, decode fully, its size, mode and EXIF orientation.

Each distinct file is opened once: `verify()` (container checks), then a full decode at a
reduced JPEG scale (`draft`, which still reads every byte, so truncation is caught) to keep
thousands of images fast. The mode and orientation are read before that decode, and judged
by `cris_model.imaging`'s policy (what training's decoding does to them). Nothing is cached
between runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
PROBE_COLUMNS = ("image_exists", "image_decodes", "image_height", "image_width", "image_error",
                 "image_conversion", "image_orientation")
_Probe = tuple[bool, bool | None, int | None, int | None, str | None, str | None, int | None]


def _probe_one(path: Path) -> _Probe:
    """(exists, decodes, height, width, error, conversion, orientation) of one file;
    decodes is None when it is absent; size, conversion and orientation None unless it
    decodes."""
    from cris_model.imaging import exif_orientation, mode_conversion  # torch: load it late

    if not path.is_file():
        return False, None, None, None, f"{path}: no such file", None, None
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            width, height = img.size
            conversion, orientation = mode_conversion(img), exif_orientation(img)
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()
    except _DECODE_ERRORS as e:
        return True, False, None, None, f"{e.__class__.__name__}: {e}", None, None
    return True, True, height, width, None, conversion, orientation


def probe_images(image_dir: Path, file_names: Iterable[str], workers: int = 4) -> pd.DataFrame:
    """One row per distinct file name, indexed by it, with columns `PROBE_COLUMNS`.

    `image_height`/`image_width` are the size as stored in pixels (null when it did not
    decode); `image_error` says why a file is missing or undecodable; `image_conversion` what
    decoding does to its mode (`cris_model.imaging.mode_conversion`, null for 8-bit RGB) and
    `image_orientation` its EXIF orientation (1 = upright).
    """
    names = sorted({str(n) for n in file_names})
    paths = [Path(image_dir) / n for n in names]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        probes = list(pool.map(_probe_one, paths))
    table = pd.DataFrame(probes, columns=list(PROBE_COLUMNS), index=pd.Index(names, name="file"))
    table["image_decodes"] = table["image_decodes"].astype(object)
    for col in ("image_height", "image_width", "image_orientation"):
        table[col] = table[col].astype("Int64")
    return table
