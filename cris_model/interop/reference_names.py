"""The one table between the reference CRIS.pytorch's tensor names and ours, both ways.

The reference (DerrickWang005/CRIS.pytorch) names its parts `backbone` (OpenAI CLIP),
`neck` (FPN), `decoder` and `proj`. Its CLIP keys are OpenAI's, which open_clip keeps, so
they pass unchanged; only the residual branch it puts inside CLIP's attention pool
(`backbone.visual.attnpool.connect`) lives in our level adapter (`levels.connect`). Every
tensor has the same layout on both sides: attention keeps its joined `in_proj_weight`
(the reference's cross-attention has kdim = vdim = d_model, as ours has whenever the text
width equals the decoder width, which holds for RN50 and RN101), CLIP's projections stay
Parameters (`text_projection`) and Linear layers (`attnpool.*_proj`) as OpenAI made them.

The one tensor we do not have is CLIP's contrastive temperature `backbone.logit_scale`,
which CRIS never uses: it is dropped on import (hence our 146,849,121 parameters for RN50
against the reference's 146,849,122).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# (reference prefix, our prefix); "{n}" stands for a layer index. Listed parent first: the
# longest matching prefix wins, so the more specific rules below a parent override it.
RENAMES: tuple[tuple[str, str], ...] = (
    ("backbone.", "backbone."),  # OpenAI CLIP names, kept by open_clip
    ("backbone.visual.attnpool.connect.", "levels.connect."),
    ("neck.txt_proj.", "neck.txt_proj."),
    ("neck.f1_v_proj.", "neck.f5_proj."),
    ("neck.norm_layer.", "neck.f5_norm."),
    ("neck.f2_v_proj.", "neck.f4_proj."),
    ("neck.f2_cat.", "neck.f4_cat."),
    ("neck.f3_v_proj.", "neck.f3_proj."),
    ("neck.f3_cat.", "neck.f3_cat."),
    ("neck.f4_proj5.", "neck.q5."),
    ("neck.f4_proj4.", "neck.q4."),
    ("neck.f4_proj3.", "neck.q3."),
    ("neck.aggr.", "neck.aggr."),
    ("neck.coordconv.0.conv1.", "neck.coord."),
    ("neck.coordconv.1.", "neck.out."),
    ("decoder.layers.{n}.", "decoder.layers.{n}."),
    ("decoder.layers.{n}.multihead_attn.", "decoder.layers.{n}.cross_attn."),
    ("decoder.norm.", "decoder.norm."),
    ("proj.", "projector."),
)

# Reference tensors with no counterpart here: CLIP's logit scale (unused by CRIS).
DROPPED: tuple[str, ...] = ("backbone.logit_scale",)


def _pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix).replace(re.escape("{n}"), r"(?P<n>\d+)"))


_FORWARD = [(_pattern(ref), ours) for ref, ours in RENAMES]
_BACKWARD = [(_pattern(ours), ref) for ref, ours in RENAMES]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    """`key` under the rule with the longest matching prefix, None when no rule matches."""
    best: tuple[int, str] | None = None
    for pattern, target in rules:
        match = pattern.match(key)
        if match and (best is None or match.end() > best[0]):
            prefix = target.replace("{n}", match.groupdict().get("n") or "")
            best = (match.end(), prefix + key[match.end():])
    return None if best is None else best[1]


def reference_to_ours(key: str) -> str | None:
    """A reference state-dict key -> ours; None for a dropped or an unknown key."""
    return None if key in DROPPED else _rename(key, _FORWARD)


def ours_to_reference(key: str) -> str | None:
    """One of our state-dict keys -> the reference's; None when it has no counterpart."""
    return _rename(key, _BACKWARD)


def from_reference(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Reference state dict (no `module.` prefix) -> (ours, reference keys no rule knows).

    Dropped tensors (DROPPED) are left out of both.
    """
    ours: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        name = reference_to_ours(key)
        if name is not None:
            ours[name] = value
        elif key not in DROPPED:
            unknown.append(key)
    return ours, unknown


def to_reference(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the reference's names (without the dropped tensors); ValueError on a
    key the table does not cover."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = ours_to_reference(key)
        if name is None:
            raise ValueError(f"no reference name for our tensor {key}")
        out[name] = value
    return out
