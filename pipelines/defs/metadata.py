"""Asset metadata that shows results in the Dagster UI: metric tables, images, the loss curve.

Images travel as small PNG thumbnails inside Markdown (data URIs), so the UI shows them
without access to the asset storage; the full-size file is linked by path beside them.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from cris_model.atomic import staged_file

THUMBNAIL_PX = 640  # longest side of an image embedded in metadata


def metrics_table(rows: Mapping[str, Mapping[str, float]]) -> MetadataValue:
    """A table with one row per split (`rows` maps split -> metrics) and a column per metric."""
    names: list[str] = []
    for metrics in rows.values():
        names += [k for k in metrics if k not in names]
    schema = TableSchema(columns=[TableColumn("split", "string")]
                         + [TableColumn(n, "float") for n in names])
    records = [TableRecord({"split": split, **{n: float(m[n]) for n in names if n in m}})
               for split, m in rows.items()]
    return MetadataValue.table(records, schema)


def breakdown_table(parts: Mapping[str, Mapping[str, Mapping[str, float]]]) -> MetadataValue:
    """metrics.json's "breakdown" as one table: a row per (by, group) with mIoU, oIoU, count."""
    schema = TableSchema(columns=[TableColumn("by", "string"), TableColumn("group", "string"),
                                  TableColumn("mIoU", "float"), TableColumn("oIoU", "float"),
                                  TableColumn("count", "int")])
    records = [TableRecord({"by": by, "group": group, "mIoU": float(m["mIoU"]),
                            "oIoU": float(m["oIoU"]), "count": int(m["count"])})
               for by, groups in parts.items() for group, m in groups.items()]
    return MetadataValue.table(records, schema)


def image_markdown(path: Path, title: str) -> MetadataValue:
    """Markdown embedding a PNG thumbnail (<= THUMBNAIL_PX) of the image at `path`."""
    from PIL import Image

    with Image.open(path) as image:
        thumb = image.convert("RGB")
        thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    markdown = f"**{title}** ({path.name})\n\n![{title}](data:image/png;base64,{data})"
    return MetadataValue.md(markdown)


def plot_curve(points: Sequence[tuple[int, float]], path: Path, title: str, ylabel: str) -> Path:
    """Draw (step, value) points as a line plot PNG at `path` (written, then renamed)."""
    if not points:
        raise ValueError(f"{path}: no points to plot for {title!r}")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps, values = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with staged_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
