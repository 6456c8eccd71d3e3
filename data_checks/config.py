"""Limits and expectations of the data validation suite, as data."""

from __future__ import annotations

from dataclasses import dataclass, field

REQUIRED_COLUMNS: tuple[str, ...] = (
    "ref_id", "sent_id", "image_id", "file_name", "height", "width", "sentence", "ann_ids",
    "category_id", "mask_rle", "bbox", "no_target", "split",
)

COLUMN_TYPES: dict[str, str] = {
    "ref_id": "int", "sent_id": "int", "image_id": "int", "height": "int", "width": "int",
    "file_name": "str", "sentence": "str", "mask_rle": "str", "split": "str", "no_target": "bool",
}

EXPECTED_SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("grefcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}


@dataclass(frozen=True)
class ValidationConfig:
    """What `validate_prepared` checks and how strictly."""

    token_limit: int = 77  # max CLIP tokens per sentence, start/end tokens included
    word_len: int = 17  # model text context: longer sentences are truncated (reported, not failed)
    bbox_tolerance: float = 1.0  # pixels a bbox may stick out of its image (float rounding)
    max_examples: int = 5  # failing rows quoted per check
    image_workers: int = 4  # threads probing images (decoding releases the GIL)
    required_columns: tuple[str, ...] = REQUIRED_COLUMNS  # manifest columns that must exist
    nullable_if_no_target: tuple[str, ...] = ("bbox", "category_id")  # null allowed if no target
    column_types: dict[str, str] = field(
        default_factory=lambda: dict(COLUMN_TYPES)
    )  # column -> value type: int | str | bool (columns that may hold nulls are left out)
    expected_splits: dict[tuple[str, str], tuple[str, ...]] = field(
        default_factory=lambda: dict(EXPECTED_SPLITS)
    )  # (dataset, split_by) -> allowed split names

    def __post_init__(self) -> None:
        if self.token_limit < 3:
            raise ValueError(f"token_limit must be >= 3, got {self.token_limit}")
        if self.word_len < 3:
            raise ValueError(f"word_len must be >= 3, got {self.word_len}")
        if self.max_examples < 1 or self.image_workers < 1:
            raise ValueError("max_examples and image_workers must be >= 1")

    def splits_for(self, dataset: str | None, split_by: str | None) -> tuple[str, ...] | None:
        """Allowed split names of a (dataset, split_by) pair; None when the pair is unknown."""
        return self.expected_splits.get((str(dataset), str(split_by)))

    def all_splits(self) -> tuple[str, ...]:
        """Every split name of every known dataset (the fallback for an unknown pair)."""
        return tuple(sorted({s for names in self.expected_splits.values() for s in names}))
