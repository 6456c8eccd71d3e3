"""The one-to-one map between Dagster assets and DVC stages (tests/test_dvc.py holds both
graphs to it: same nodes, same edges). `evaluation` is one partitioned asset in Dagster and a
`foreach` over `eval.splits` in DVC (stages `evaluation@<split>`)."""

from __future__ import annotations

ASSET_TO_STAGE: dict[str, str] = {
    "raw_dataset": "raw_dataset",  # cris data synth (or fetch) -> data/raw
    "prepared_splits": "prepared_splits",  # cris data prepare + validate -> data/prepared
    "clip_features": "clip_features",  # cris features cache -> data/features
    "trained_model": "trained_model",  # cris train -> runs/train/{best,last}
    "evaluation": "evaluation",  # cris evaluate, one per split -> runs/eval/<split>
    "registered_model": "registered_model",  # cris register -> runs/registered.json
}

FOREACH_SEPARATOR = "@"  # DVC names a foreach stage's instances <stage>@<item>
