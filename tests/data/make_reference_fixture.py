"""Regenerate tests/data/reference_cris.json by running the real reference CRIS.pytorch.

    python tests/data/make_reference_fixture.py --reference /path/to/CRIS.pytorch

It pins, from the reference's own modules (DerrickWang005/CRIS.pytorch; nothing of its code
is copied here, it is imported from the checkout given):
- the name and shape of every tensor of its RN50 and RN101 CRIS (its configs for RefCOCO),
  built on the meta device;
- its logits, in float32 as it computes them, for the seeded tiny CRIS of
  tests/reference_support.py given its weights under the reference's names (which its
  load_state_dict(strict=True) must accept) on fixed inputs.

The reference loads CLIP with torch.jit.load; here that call is answered with a CLIP state
dict instead, and its package's logging import (loguru) is stubbed when absent.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: reference_support
sys.path.insert(1, str(HERE.parents[1]))  # the repository: cris_model

from reference_support import (  # noqa: E402
    INPUT_SIZE,
    PHRASES,
    fixture_inputs,
    reference_state,
    tiny_model,
)

# The reference's YAML values of each model (config/refcoco/cris_r*.yaml), and its CLIPs.
HEADS = {"cris_r50": dict(fpn_in=[512, 1024, 1024], word_dim=1024),
         "cris_r101": dict(fpn_in=[512, 1024, 512], word_dim=512)}
CLIPS = {"cris_r50": dict(embed_dim=1024, vision_layers=(3, 4, 6, 3)),
         "cris_r101": dict(embed_dim=512, vision_layers=(3, 4, 23, 3))}


def _reference_modules(checkout: Path) -> tuple[Any, Any]:
    """The reference's model.segmenter and model.clip modules, imported from `checkout`."""
    if "loguru" not in sys.modules:
        try:
            import loguru  # noqa: F401
        except ImportError:
            sys.modules["loguru"] = types.SimpleNamespace(logger=None)  # type: ignore
    sys.path.insert(0, str(checkout))
    import model.clip as clip  # type: ignore[import-not-found]
    import model.segmenter as segmenter  # type: ignore[import-not-found]

    return segmenter, clip


def _build(segmenter: Any, clip_state: dict[str, torch.Tensor], **head: Any) -> Any:
    """The reference's CRIS(cfg) with torch.jit.load answering `clip_state`."""
    stub = types.SimpleNamespace(eval=lambda: stub, state_dict=lambda: dict(clip_state))
    segmenter.torch.jit.load = lambda *args, **kwargs: stub
    values = dict(clip_pretrain="-", word_len=17, fpn_out=[256, 512, 1024], vis_dim=512,
                  num_layers=3, num_head=8, dim_ffn=2048, dropout=0.1, intermediate=False)
    return segmenter.CRIS(types.SimpleNamespace(**{**values, **head}))


def _shapes(segmenter: Any, clip: Any) -> dict[str, dict[str, str]]:
    """{model: {tensor: "AxBxC" ("" for a scalar)}} of the reference's RN50 / RN101 CRIS."""
    out = {}
    for name, dims in CLIPS.items():
        with torch.device("meta"):
            openai = clip.CLIP(image_resolution=224, vision_width=64, vision_patch_size=None,
                               context_length=77, txt_length=17, vocab_size=49408,
                               transformer_width=512, transformer_heads=8,
                               transformer_layers=12, **dims)
            model = _build(segmenter, openai.state_dict(), **HEADS[name])
        out[name] = {k: "x".join(map(str, v.shape)) for k, v in model.state_dict().items()}
    return out


def _tiny_logits(segmenter: Any) -> torch.Tensor:
    """The reference's logits for the seeded tiny CRIS on fixture_inputs()."""
    state = reference_state(tiny_model())
    clip_state = {k.removeprefix("backbone."): v for k, v in state.items()
                  if k.startswith("backbone.") and ".attnpool.connect." not in k}
    model = _build(segmenter, clip_state, fpn_in=[128, 256, 128], fpn_out=[64, 128, 128],
                   vis_dim=128, num_layers=2, num_head=4, dim_ffn=256, dropout=0.0,
                   word_dim=128)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.float().eval()(*fixture_inputs())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="CRIS.pytorch checkout")
    parser.add_argument("--out", type=Path, default=HERE / "reference_cris.json")
    args = parser.parse_args()
    segmenter, clip = _reference_modules(args.reference)
    logits = _tiny_logits(segmenter)
    commit = subprocess.run(["git", "-C", str(args.reference), "rev-parse", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    fixture = {"generated_by": "tests/data/make_reference_fixture.py",
               "reference_commit": commit or "unknown", "torch": torch.__version__,
               "shapes": _shapes(segmenter, clip),
               "tiny": {"input_size": INPUT_SIZE, "phrases": PHRASES,
                        "shape": list(logits.shape),
                        "logits": [" ".join(f"{v:.7g}" for v in row)
                                   for row in logits.flatten(0, 2).tolist()]}}
    args.out.write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {sum(map(len, fixture['shapes'].values()))} tensor shapes, "
          f"{logits.numel()} logits")


if __name__ == "__main__":
    main()
