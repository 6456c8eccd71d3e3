"""The `eval:` section of params.yaml: which splits are evaluated, and how masks are scored.

Kept apart from `evaluate.py` so that reading it needs no torch: the Dagster definitions read
`eval.splits` (their evaluation partitions) when they load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cris_model.params import SectionConfig

PRECISIONS = ("fp32", "bf16")  # arithmetic of evaluation: exact float32, or bf16 autocast


@dataclass(frozen=True)
class EvalConfig(SectionConfig):
    """How `cris evaluate`, the pipelines and training's validation score a split."""

    SECTION = "eval"

    splits: list[str] = field(default_factory=lambda: ["val"])  # splits evaluated after
    # training (Dagster partitions, DVC foreach items); model selection uses val only
    threshold: float | None = None  # sigmoid threshold of the mask; None = the checkpoint's
    precision: str = "fp32"  # fp32 (exact figures) | bf16 (autocast: faster on a GPU)

    def validate(self) -> None:
        """Raise ValueError naming the first value no evaluation can use."""
        if not self.splits or not all(isinstance(s, str) and s for s in self.splits):
            raise ValueError(f"eval.splits must be a non-empty list of split names, got "
                             f"{self.splits!r}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"eval.threshold must be in (0, 1), got {self.threshold}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"eval.precision must be {' or '.join(PRECISIONS)}, got "
                             f"{self.precision!r}")
