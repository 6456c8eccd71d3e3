"""A procedural referring dataset written in the original refer layout.

`generate(out, images, seed)` draws scenes of 2-5 coloured shapes (circle, oval, square,
triangle, star, hexagon) on textured backgrounds, some partly hidden behind others, and
writes them exactly as the public files are laid out, so the real readers consume them:

    out/images/mscoco/images/train2014/COCO_train2014_%012d.jpg   (JPEG, 128x96 and others)
    out/refcoco/instances.json, out/refcoco/refs(unc).p          (single-target phrases)
    out/grefcoco/instances.json, out/grefcoco/grefs(unc).json    (+ multi- and no-target)
    out/synth/scenes.json   per-object attributes and each sentence's grammar family
    out/<dataset>/sentence_kinds.json  each sentence's phrase kind (`KIND_OF_FAMILY`),
                                       carried into the manifest by `cris data prepare`

Annotations are the visible part of each shape as COCO polygons: the shape's own polygon
when nothing covers it, else pixel-exact outlines of what is left. Splits are by image,
about 70/10/10/10: train, val, testA (only round shapes are referred), testB (only angular
ones). Every phrase is checked to select exactly its targets (see synth_grammar). The same
seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from cris_model.atomic import staged_dir
from cris_model.data.refer import KINDS_FILE
from cris_model.data.synth_grammar import (
    COLOURS,
    ROUND_SHAPES,
    SHAPES,
    PhraseSet,
    Scene,
    SceneObject,
    image_phrases,
    normalize,
)

CATEGORY_IDS = {"circle": 1, "oval": 3, "square": 5, "triangle": 6, "star": 9, "hexagon": 12}
COLOUR_RGB = {"red": (210, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 215),
              "yellow": (235, 205, 35), "purple": (140, 60, 190), "orange": (240, 130, 30)}
IMAGE_SIZES = ((128, 96), (128, 96), (128, 96), (96, 128), (112, 112))  # (width, height)
SPLITS = ("train", "val", "testA", "testB")
IMAGE_DIR = Path("images/mscoco/images/train2014")
MARKER = Path("synth/scenes.json")  # marks a folder as written by this generator
KIND_OF_FAMILY = {"attribute": "attribute", "position": "spatial", "size": "superlative",
                  "ordinal": "ordinal", "relation": "relation", "multi": "multi-target",
                  "none": "no-target"}  # grammar family -> phrase kind (refer.SENTENCE_KINDS)
# shape -> (corners, corner radius / radius, angle of the first corner); stars alternate
# their corners with inner ones at 45% of the radius.
_CORNERS = {"square": (4, 1.245, np.pi / 4), "triangle": (3, 1.2, -np.pi / 2),
            "star": (10, 1.25, -np.pi / 2), "hexagon": (6, 1.02, 0.0)}


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the scene generator (the defaults are what the demo is tuned for)."""

    min_objects: int = 2  # shapes per image, at least
    max_objects: int = 5  # shapes per image, at most
    min_radius: float = 8.0  # shape radius in px (>= 16 px across)
    max_radius: float = 19.0  # shape radius in px
    min_visible: float = 0.55  # every shape keeps at least this fraction visible
    jpeg_quality: int = 90  # PIL JPEG quality
    place_tries: int = 40  # random placements tried per shape before dropping it
    scene_tries: int = 50  # scenes tried per image before giving up
    eval_fraction: float = 0.1  # fraction of images in each of val, testA, testB
    image_sizes: tuple[tuple[int, int], ...] = IMAGE_SIZES  # (width, height) drawn uniformly
    pixel_noise: float = 3.0  # std of the Gaussian grain on every pixel (0-255 scale)


@dataclass
class _Placed:
    """One drawn shape: polygon (flat [x1, y1, ...] in px) and its full HxW bool mask."""

    shape: str
    colour: str
    polygon: list[float]
    full: np.ndarray
    cx: float
    cy: float
    radius: float


def _outline(shape: str, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Kx2 polygon vertices of a shape centred on (0, 0), slightly turned."""
    if shape in ("circle", "oval"):
        t = np.linspace(0.0, 2 * np.pi, 28, endpoint=False)
        a, b = (radius, radius) if shape == "circle" else (1.3 * radius, 0.78 * radius)
        pts = np.stack([a * np.cos(t), b * np.sin(t)], axis=1)
        spin = rng.uniform(0.0, np.pi) if shape == "oval" else 0.0
    else:
        n, scale, start = _CORNERS[shape]
        t = start + np.arange(n) * 2 * np.pi / n
        rad = np.full(n, scale * radius)
        if shape == "star":
            rad[1::2] *= 0.45
        pts = np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)
        spin = rng.uniform(-0.2, 0.2)
    rot = np.array([[np.cos(spin), -np.sin(spin)], [np.sin(spin), np.cos(spin)]])
    return pts @ rot.T


def _rasterize(seg: list, h: int, w: int) -> np.ndarray:
    """COCO polygon list -> HxW bool mask, rasterised by pycocotools as readers will."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))).astype(bool)


def _place_objects(rng: np.random.Generator, specs: list[tuple[str, str]], h: int, w: int,
                   cfg: SynthConfig) -> list[_Placed]:
    """Drop shapes one on top of the other, each wholly inside the image, keeping every
    earlier shape at least `cfg.min_visible` visible; a shape that never fits is left out."""
    placed: list[_Placed] = []
    covers: list[np.ndarray] = []
    for shape, colour in specs:
        for _ in range(cfg.place_tries):
            radius = float(np.exp(rng.uniform(np.log(cfg.min_radius), np.log(cfg.max_radius))))
            pts = _outline(shape, radius, rng)
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            if hi[0] - lo[0] > w - 4 or hi[1] - lo[1] > h - 4:
                continue
            cx, cy = rng.uniform(2 - lo[0], w - 2 - hi[0]), rng.uniform(2 - lo[1], h - 2 - hi[1])
            poly = [round(float(v), 2) for v in (pts + [cx, cy]).ravel()]
            full = _rasterize([poly], h, w)
            grown = [c | full for c in covers]
            if all((p.full & ~c).sum() >= cfg.min_visible * p.full.sum()
                   for p, c in zip(placed, grown, strict=True)):
                placed.append(_Placed(shape, colour, poly, full, cx, cy, radius))
                covers = [*grown, np.zeros_like(full)]
                break
    return placed


def _next_edge(outs: list[tuple[int, int]], cur: tuple[int, int],
               heading: tuple[int, int] | None) -> tuple[int, int]:
    """Pick the outgoing edge at a vertex, turning right where two meet (keeps 4-connected
    parts apart)."""
    if heading is not None and len(outs) > 1:
        right = (cur[0] - heading[1], cur[1] + heading[0])
        if right in outs:
            return right
    return outs[0]


def _trace_polygons(mask: np.ndarray) -> list[list[int]] | None:
    """Outlines of a HxW bool mask along pixel edges, as flat [x1, y1, ...] lists.

    Vertices sit on pixel corners, so pycocotools rasterises them back to `mask`. Returns
    None when the mask has a hole, which COCO polygons cannot express.
    """
    m = np.pad(mask, 1)
    core = m[1:-1, 1:-1]
    nxt: dict[tuple[int, int], list[tuple[int, int]]] = {}
    sides = (((-1, 0), (0, 0), (1, 0)), ((0, 1), (1, 0), (1, 1)),
             ((1, 0), (1, 1), (0, 1)), ((0, -1), (0, 1), (0, 0)))
    for (dy, dx), a, b in sides:
        outside = ~m[1 + dy : m.shape[0] - 1 + dy, 1 + dx : m.shape[1] - 1 + dx]
        ys, xs = np.nonzero(core & outside)
        for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
            nxt.setdefault((x + a[0], y + a[1]), []).append((x + b[0], y + b[1]))
    polys = []
    while nxt:
        start = cur = next(iter(nxt))
        heading: tuple[int, int] | None = None
        loop: list[tuple[int, int]] = []
        first: tuple[int, int] | None = None
        while True:
            to = _next_edge(nxt[cur], cur, heading)
            nxt[cur].remove(to)
            if not nxt[cur]:
                del nxt[cur]
            step = (to[0] - cur[0], to[1] - cur[1])
            if step != heading:
                loop.append(cur)
            first = first or step
            cur, heading = to, step
            if cur == start:
                break
        if heading == first:  # the start vertex lies mid-edge
            loop = loop[1:]
        xs_, ys_ = np.array([p[0] for p in loop]), np.array([p[1] for p in loop])
        if float(np.dot(xs_, np.roll(ys_, -1)) - np.dot(np.roll(xs_, -1), ys_)) <= 0:
            return None
        polys.append([v for p in loop for v in p])
    return polys


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 float texture: a muted colour with a gradient, stripes, blotches or checks."""
    base = rng.uniform(85, 175) + rng.uniform(-15, 15, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    kind = int(rng.integers(4))
    if kind == 0:
        tex = (along / max(h, w) - 0.5)[..., None] * rng.uniform(-50, 50, 3)
    elif kind == 1:
        wave = np.sin(2 * np.pi * along / rng.uniform(5, 14) + rng.uniform(0, 2 * np.pi))
        tex = wave[..., None] * rng.uniform(6, 16, 3)
    elif kind == 2:
        coarse = rng.uniform(-22, 22, (h // 12 + 2, w // 12 + 2, 3)) + 128
        img = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
        tex = np.asarray(img, dtype=np.float64) - 128
    else:
        cell = int(rng.integers(6, 14))
        tex = (((xx // cell + yy // cell) % 2) - 0.5)[..., None] * rng.uniform(10, 24)
    return base + tex


def _paint(rng: np.random.Generator, placed: list[_Placed], h: int, w: int,
           noise: float) -> np.ndarray:
    """HxWx3 uint8 image: background, then each shape (shaded fill, dark rim) in order, then
    Gaussian grain of std `noise`."""
    img = _background(rng, h, w)
    for p in placed:
        base = np.array(COLOUR_RGB[p.colour], dtype=np.float64) + rng.uniform(-14, 14, 3)
        a = rng.uniform(0, 2 * np.pi)
        ys, xs = np.nonzero(p.full)
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        full = p.full[box]
        yy, xx = np.mgrid[box]
        ramp = ((xx - p.cx) * np.cos(a) + (yy - p.cy) * np.sin(a)) / p.radius
        fill = (1 + 0.12 * np.clip(ramp, -1, 1))[..., None] * base
        m = np.pad(full, 1)
        inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        fill[full & ~inner] = 0.55 * base
        img[box][full] = fill[full]
    img += rng.normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass
class _Image:
    """One finished image: pixels, annotations and phrases."""

    image: dict[str, Any]
    annotations: list[dict[str, Any]]
    scene: Scene
    phrases: PhraseSet
    jpeg: bytes


def _split_of_images(images: int, seed: int, cfg: SynthConfig) -> list[str]:
    """A split name per image: shuffled, each held-out split >= 1 image."""
    n_eval = max(1, round(images * cfg.eval_fraction))
    names = ["val"] * n_eval + ["testA"] * n_eval + ["testB"] * n_eval
    names += ["train"] * (images - len(names))
    order = np.random.default_rng([seed, 1]).permutation(images)
    return [names[i] for i in order]


def _object_specs(rng: np.random.Generator, split: str, cfg: SynthConfig) -> list[tuple[str, str]]:
    """(shape, colour) per object in drawing order; test splits get >= 2 of their group."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    round_, angular = sorted(ROUND_SHAPES), [s for s in SHAPES if s not in ROUND_SHAPES]
    group, others = {"testA": (round_, angular), "testB": (angular, round_)}.get(
        split, (list(SHAPES), []))
    n_group = n if not others else int(rng.integers(2, n + 1))
    specs: list[tuple[str, str]] = []
    for j in range(n):
        pool = group if j < n_group else others
        same = [s for s, _ in specs if s in pool]
        shape = same[int(rng.integers(len(same)))] if same and rng.random() < 0.35 \
            else pool[int(rng.integers(len(pool)))]
        colours = [c for _, c in specs]
        colour = colours[int(rng.integers(len(colours)))] if colours and rng.random() < 0.35 \
            else COLOURS[int(rng.integers(len(COLOURS)))]
        specs.append((shape, colour))
    return [specs[i] for i in rng.permutation(n)]


def _segmentations(placed: list[_Placed], h: int, w: int) -> list[list] | None:
    """Visible-part polygons per object; None when a visible part has a hole."""
    covered = np.zeros((h, w), dtype=bool)
    segs: list[list] = []
    for p in reversed(placed):
        visible = p.full & ~covered
        covered |= p.full
        seg = [p.polygon] if not (p.full & ~visible).any() else _trace_polygons(visible)
        if seg is None or not np.array_equal(_rasterize(seg, h, w), visible):
            return None
        segs.append(seg)
    return segs[::-1]


def _scene(placed: list[_Placed], first_ann: int, h: int, w: int) -> Scene:
    """The grammar's view of the drawn shapes: attributes from the full masks."""
    objects = []
    for k, p in enumerate(placed):
        ys, xs = np.nonzero(p.full)
        objects.append(SceneObject(first_ann + k, p.shape, p.colour, float(len(xs)),
                                   round(float(xs.mean()) + 0.5, 2),
                                   round(float(ys.mean()) + 0.5, 2)))
    hidden = {}
    for i, back in enumerate(placed):
        for j in range(i + 1, len(placed)):
            overlap = int((back.full & placed[j].full).sum())
            if overlap:
                hidden[(first_ann + j, first_ann + i)] = round(overlap / objects[i].area, 4)
    return Scene(w, h, tuple(objects), hidden)


def _draw_image(rng: np.random.Generator, image_id: int, first_ann: int, split: str,
                cfg: SynthConfig) -> _Image:
    """Draw scenes until one places, outlines and phrases cleanly (RuntimeError if never)."""
    w, h = cfg.image_sizes[int(rng.integers(len(cfg.image_sizes)))]
    for _ in range(cfg.scene_tries):
        specs = _object_specs(rng, split, cfg)
        placed = _place_objects(rng, specs, h, w, cfg)
        segs = _segmentations(placed, h, w) if len(placed) >= 2 else None
        if segs is None:
            continue
        scene = _scene(placed, first_ann, h, w)
        group = {"testA": ROUND_SHAPES, "testB": frozenset(SHAPES) - ROUND_SHAPES}.get(split)
        eligible = [o.key for o in scene.objects if group is None or o.shape in group]
        phrases = image_phrases(rng, scene, eligible)
        if not phrases.single:
            continue
        pixels = _paint(rng, placed, h, w, cfg.pixel_noise)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=cfg.jpeg_quality)
        name = f"COCO_train2014_{image_id:012d}.jpg"
        anns = [_annotation(first_ann + k, image_id, p.shape, seg, h, w)
                for k, (p, seg) in enumerate(zip(placed, segs, strict=True))]
        info = {"id": image_id, "file_name": name, "height": h, "width": w}
        return _Image(info, anns, scene, phrases, buf.getvalue())
    raise RuntimeError(f"image {image_id}: no valid scene in {cfg.scene_tries} tries")


def _annotation(ann_id: int, image_id: int, shape: str, seg: list, h: int, w: int) -> dict:
    """COCO annotation of one visible part; bbox and area are those of its rasterisation."""
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    bbox = [round(float(v), 2) for v in mask_utils.toBbox(rle)]
    return {"id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[shape],
            "bbox": bbox, "area": float(mask_utils.area(rle)), "iscrowd": 0,
            "segmentation": seg}


def _sentences(phrases: list[tuple[str, str]], next_sent: int, families: dict[str, str],
               ) -> list[dict[str, Any]]:
    """refer sentence records for (family, raw) phrases, numbered from next_sent."""
    out = []
    for k, (family, raw) in enumerate(phrases):
        sent = normalize(raw)
        out.append({"sent_id": next_sent + k, "raw": raw, "sent": sent,
                    "tokens": sent.split()})
        families[str(next_sent + k)] = family
    return out


def _ref_records(drawn: list[_Image], splits: list[str], grouped: bool,
                 families: dict[str, str]) -> list[dict[str, Any]]:
    """refs(unc).p records (grouped=False) or grefs(unc).json records (grouped=True)."""
    refs: list[dict[str, Any]] = []
    next_sent = 1
    for img, split in zip(drawn, splits, strict=True):
        cat = {a["id"]: a["category_id"] for a in img.annotations}
        items = img.phrases.single + (img.phrases.multi + img.phrases.none if grouped else [])
        for keys, phrases in items:
            sentences = _sentences(phrases, next_sent, families)
            next_sent += len(sentences)
            anns = list(keys) if keys else [-1]
            stem = img.image["file_name"][: -len(".jpg")]
            rec: dict[str, Any] = {
                "ref_id": len(refs) + 1, "ann_id": anns if grouped else anns[0],
                "image_id": img.image["id"],
                "category_id": [cat.get(a, -1) for a in anns] if grouped else cat[anns[0]],
                "split": split, "file_name": f"{stem}_{anns[0]}.jpg",
                "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
            }
            if grouped:
                rec["no_target"] = not keys
            refs.append(rec)
    return refs


def _instances(drawn: list[_Image], seed: int) -> dict[str, Any]:
    """instances.json content: images, annotations, one category per shape."""
    cats = [{"id": i, "name": s, "supercategory": "round" if s in ROUND_SHAPES else "angular"}
            for s, i in CATEGORY_IDS.items()]
    return {"info": {"description": f"synthetic shapes (cris_model.data.synth), seed {seed}"},
            "images": [d.image for d in drawn],
            "annotations": [a for d in drawn for a in d.annotations], "categories": cats}


def _scenes_record(drawn: list[_Image], splits: list[str], seed: int,
                   families: dict[str, dict[str, str]]) -> dict[str, Any]:
    """synth/scenes.json: each object's attributes (keyed by ann_id), who hides whom as
    [front ann_id, back ann_id, fraction of back hidden], and the family of each sent_id."""
    scenes = [{"image_id": d.image["id"], "split": split, "width": d.scene.width,
               "height": d.scene.height,
               "objects": [vars(o) for o in d.scene.objects],
               "hidden": [[f, b, v] for (f, b), v in d.scene.hidden.items()]}
              for d, split in zip(drawn, splits, strict=True)]
    return {"generator": "cris_model.data.synth", "seed": seed, "scenes": scenes,
            "families": families}


def _check_out(out: Path) -> None:
    """Refuse to overwrite anything but an empty folder or an earlier synth output."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ValueError(f"{out}: refusing to replace a non-empty folder that holds no "
                         f"{MARKER} from an earlier synth run")


def _write_tree(tmp: Path, drawn: list[_Image], splits: list[str], seed: int) -> None:
    """Write the whole refer layout under the (new, temporary) folder `tmp`."""
    image_dir = tmp / IMAGE_DIR
    image_dir.mkdir(parents=True)
    for d in drawn:
        (image_dir / d.image["file_name"]).write_bytes(d.jpeg)
    instances = json.dumps(_instances(drawn, seed)).encode()
    families: dict[str, dict[str, str]] = {"refcoco": {}, "grefcoco": {}}
    for name in ("refcoco", "grefcoco"):
        (tmp / name).mkdir()
        (tmp / name / "instances.json").write_bytes(instances)
    refs = _ref_records(drawn, splits, False, families["refcoco"])
    (tmp / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    grefs = _ref_records(drawn, splits, True, families["grefcoco"])
    (tmp / "grefcoco" / "grefs(unc).json").write_text(json.dumps(grefs), encoding="utf-8")
    for name, by_sent in families.items():
        kinds = {sent: KIND_OF_FAMILY[family] for sent, family in by_sent.items()}
        (tmp / name / KINDS_FILE).write_text(json.dumps(kinds), encoding="utf-8")
    (tmp / MARKER).parent.mkdir()
    (tmp / MARKER).write_text(json.dumps(_scenes_record(drawn, splits, seed, families)),
                              encoding="utf-8")


def _summary(out: Path, drawn: list[_Image], splits: list[str], seed: int) -> dict[str, Any]:
    """Counts of images, refs and sentences per split and kind (single, multi, none)."""
    counts: dict[str, Any] = {"images": {s: splits.count(s) for s in SPLITS}}
    for kind in ("single", "multi", "none"):
        items = [(split, ref) for d, split in zip(drawn, splits, strict=True)
                 for ref in getattr(d.phrases, kind)]
        counts[f"{kind}_target_refs"] = {s: sum(1 for sp, _ in items if sp == s) for s in SPLITS}
        counts[f"{kind}_target_sentences"] = {
            s: sum(len(r[1]) for sp, r in items if sp == s) for s in SPLITS}
    families = Counter(f for d in drawn for _, phrases in d.phrases.single for f, _ in phrases)
    return {"root": str(out), "seed": seed, "images": len(drawn),
            "annotations": sum(len(d.annotations) for d in drawn), "splits": counts,
            "single_target_families": dict(sorted(families.items()))}


def generate(out: Path, images: int, seed: int, config: SynthConfig | None = None,
             ) -> dict[str, Any]:
    """Write a synthetic RefCOCO + gRefCOCO pair under `out`; returns counts (JSON-able).

    Replaces `out` only when it is empty or an earlier synth output; raises ValueError on
    bad arguments. Deterministic: the same (images, seed, config) gives identical bytes.
    """
    cfg = config or SynthConfig()
    if images < 4:
        raise ValueError(f"images must be >= 4 (one per split), got {images}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 2 <= cfg.min_objects <= cfg.max_objects:
        raise ValueError(f"need 2 <= min_objects <= max_objects, got {cfg.min_objects}, "
                         f"{cfg.max_objects}")
    if cfg.pixel_noise < 0:
        raise ValueError(f"pixel_noise must be >= 0, got {cfg.pixel_noise}")
    if not cfg.image_sizes or min(min(size) for size in cfg.image_sizes) <= 0:
        raise ValueError(f"image_sizes must be non-empty (width, height) pairs > 0, got "
                         f"{cfg.image_sizes}")
    out = Path(out).absolute()
    _check_out(out)
    splits = _split_of_images(images, seed, cfg)
    drawn, next_ann = [], 1
    for i, split in enumerate(splits):
        img = _draw_image(np.random.default_rng([seed, 2, i]), i + 1, next_ann, split, cfg)
        next_ann += len(img.annotations)
        drawn.append(img)
    with staged_dir(out) as tmp:
        _write_tree(tmp, drawn, splits, seed)
    return _summary(out, drawn, splits, seed)
