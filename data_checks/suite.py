"""The great-expectations suite over a prepared manifest (rows plus derived columns).

Each check is data: a stable name, a built-in expectation class and its arguments, the
columns it needs and the columns quoted beside a failing row. `run_suite` builds one
ephemeral GX context, one pandas data source / dataframe asset / batch definition and one
ExpectationSuite, validates the frame once, and turns each expectation's result into a
`CheckResult`. A check whose columns are absent is `skipped` (the missing-column check fails).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from data_checks.config import ValidationConfig
from data_checks.derived import DERIVED_FROM, IMAGE_FOLDER
from data_checks.report import CheckResult, Status

_EXAMPLE_POOL = 10  # GX returns this many failing rows per example quoted, to pick distinct ones
TYPE_NAMES: dict[str, list[str]] = {
    "int": ["int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
            "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"],
    "str": ["str"],
    "bool": ["bool", "boolean"],
}  # type family -> dtype / Python type names great-expectations accepts for it
TARGET = "no_target == False"
NO_TARGET = "no_target == True"


@dataclass(frozen=True)
class CheckSpec:
    """One expectation of the suite, described as data."""

    name: str  # stable check id (Dagster asset check name)
    group: str  # columns | splits | sentences | masks | boxes | images
    description: str  # one line: what must hold
    expectation: str  # class name in great_expectations.expectations
    kwargs: dict[str, Any]  # its arguments (column, value_set, row_condition, ...)
    expected: str  # the expectation in words, for reports
    needs: tuple[str, ...] = ()  # columns (manifest or derived) it reads
    context: tuple[str, ...] = ()  # columns shown beside each failing row
    value: str | None = None  # column whose value is quoted (default: the kwargs column)


def _col(name: str, group: str, description: str, expectation: str, column: str,
         expected: str, context: tuple[str, ...] = (), condition: str | None = None,
         **kwargs: Any) -> CheckSpec:
    """A single-column expectation, optionally restricted by a pandas row condition."""
    needs: tuple[str, ...] = (column,)
    if condition is not None:
        kwargs |= {"row_condition": condition, "condition_parser": "pandas"}
        needs += ("no_target",)
    return CheckSpec(name, group, description, expectation, {"column": column, **kwargs},
                     expected, needs, context)


def _column_specs(config: ValidationConfig) -> list[CheckSpec]:
    specs = [CheckSpec(
        "required_columns_present", "columns", "every required manifest column exists",
        "ExpectTableColumnsToMatchSet",
        {"column_set": list(config.required_columns), "exact_match": False},
        f"columns include {list(config.required_columns)}",
    )]
    for c in config.required_columns:
        optional = c in config.nullable_if_no_target
        specs.append(_col(
            f"{c}_not_null", "columns",
            f"{c} is never null" + (" on target rows" if optional else ""),
            "ExpectColumnValuesToNotBeNull", c, "no nulls", ("sent_id",),
            TARGET if optional else None,
        ))
    for c, family in config.column_types.items():
        if family not in TYPE_NAMES:
            raise ValueError(f"column_types[{c!r}] = {family!r}: not one of {list(TYPE_NAMES)}")
        specs.append(_col(f"{c}_type", "columns", f"{c} values are {family}",
                          "ExpectColumnValuesToBeInTypeList", c, family, ("sent_id",),
                          type_list=TYPE_NAMES[family]))
    specs += [
        _col("sent_id_unique", "columns", "each sentence id appears once over all splits",
             "ExpectColumnValuesToBeUnique", "sent_id", "unique", ("ref_id", "sentence")),
        _col("file_name_relative", "columns", "file_name is relative to image_dir, without '..'",
             "ExpectColumnValuesToNotMatchRegex", "file_name", "no leading / and no '..' part",
             (), regex=r"^[/\\]|(?:^|[/\\])\.\.(?:[/\\]|$)"),
        _col("height_positive", "columns", "recorded image height >= 1",
             "ExpectColumnValuesToBeBetween", "height", ">= 1", ("file_name",), min_value=1),
        _col("width_positive", "columns", "recorded image width >= 1",
             "ExpectColumnValuesToBeBetween", "width", ">= 1", ("file_name",), min_value=1),
    ]
    return specs


def _split_specs(splits: Sequence[str]) -> list[CheckSpec]:
    allowed = list(splits)
    return [
        _col("split_names_expected", "splits", "split column holds this dataset's split names",
             "ExpectColumnValuesToBeInSet", "split", f"one of {allowed}", ("source_split",),
             value_set=allowed),
        _col("split_files_expected", "splits", "manifest files are named <split>.parquet",
             "ExpectColumnValuesToBeInSet", "source_split", f"one of {allowed}", (),
             value_set=allowed),
        CheckSpec("split_matches_file", "splits", "each row's split is the file it is in",
                  "ExpectColumnPairValuesToBeEqual",
                  {"column_A": "split", "column_B": "source_split"},
                  "split == file name stem", ("split", "source_split"), ("split",),
                  "source_split"),
        _col("no_image_shared_with_train", "splits",
             "no image of val/test splits also appears in train", "ExpectColumnValuesToBeInSet",
             "image_in_train", "no val/test image_id in train",
             ("image_id", "file_name", "source_split"), value_set=[False]),
    ]


def _content_specs(config: ValidationConfig) -> list[CheckSpec]:
    tol = config.bbox_tolerance
    return [
        _col("sentence_not_empty", "sentences", "every sentence has a non-space character",
             "ExpectColumnValuesToMatchRegex", "sentence", r"matches \S", ("sent_id",),
             regex=r"\S"),
        _col("sentence_within_token_limit", "sentences",
             f"CLIP tokens per sentence (start/end included) <= {config.token_limit}",
             "ExpectColumnValuesToBeBetween", "token_count", f"<= {config.token_limit} tokens",
             ("sentence",), max_value=config.token_limit),
        _col("mask_rle_valid", "masks", "mask_rle is a compressed RLE of a height x width mask",
             "ExpectColumnValuesToBeNull", "mask_rle_error", "no RLE errors",
             ("height", "width")),
        _col("mask_area_positive_for_targets", "masks", "target rows have a non-empty mask",
             "ExpectColumnValuesToBeBetween", "mask_area", ">= 1 pixel",
             ("sent_id", "sentence"), TARGET, min_value=1),
        _col("mask_empty_for_no_target", "masks", "no-target rows have an empty mask",
             "ExpectColumnValuesToBeBetween", "mask_area", "0 pixels", ("sent_id", "sentence"),
             NO_TARGET, max_value=0),
        _col("bbox_well_formed", "boxes", "target bboxes are [x, y, w, h] with w, h > 0",
             "ExpectColumnValuesToBeNull", "bbox_error", "no bbox errors", ("sent_id",)),
        _col("bbox_inside_image", "boxes", f"target bboxes lie inside the image (+-{tol} px)",
             "ExpectColumnValuesToBeBetween", "bbox_overflow", f"overflow <= {tol} px",
             ("bbox", "width", "height"), max_value=tol),
        _col("image_exists", "images", "every image file exists under image_dir",
             "ExpectColumnValuesToBeInSet", "image_exists", "true", ("file_name",),
             value_set=[True]),
        _col("image_decodes", "images", "every image decodes completely",
             "ExpectColumnValuesToBeInSet", "image_decodes", "true", ("file_name", "image_error"),
             value_set=[True]),
        CheckSpec("image_size_matches", "images", "decoded image size equals recorded HxW",
                  "ExpectColumnPairValuesToBeEqual",
                  {"column_A": "recorded_size", "column_B": "image_size",
                   "ignore_row_if": "either_value_is_missing"},
                  "decoded HxW == recorded HxW", ("recorded_size", "image_size"),
                  ("file_name", "image_size"), "recorded_size"),
    ]


def check_specs(config: ValidationConfig | None = None,
                splits: Sequence[str] | None = None) -> list[CheckSpec]:
    """Every expectation of the suite, in report order (names are stable for Dagster).

    `splits` are the allowed split names (default: all known ones).
    """
    config = config or ValidationConfig()
    allowed = list(splits) if splits is not None else list(config.all_splits())
    return _column_specs(config) + _split_specs(allowed) + _content_specs(config)


def _gx() -> tuple[Any, Any]:
    """great_expectations and its expectations module, imported quietly (analytics off).

    GX logs registration chatter at import and pins one module logger to INFO: both are
    raised to WARNING.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    import great_expectations.expectations as gxe

    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    return gx, gxe


def run_suite(frame: pd.DataFrame, specs: Sequence[CheckSpec],
              max_examples: int = 5) -> list[CheckResult]:
    """Validate `frame` (RangeIndex) against `specs` in one ephemeral GX context."""
    gx, gxe = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = _plain_strings(frame)
    runnable = [s for s in specs if set(s.needs).issubset(frame.columns)]
    results: dict[str, Any] = {}
    if runnable:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        batch = (context.data_sources.add_pandas("prepared")
                 .add_dataframe_asset("manifest")
                 .add_batch_definition_whole_dataframe("all_rows"))
        expectations = [getattr(gxe, s.expectation)(**s.kwargs, meta={"check": s.name})
                         for s in runnable]
        suite = context.suites.add(
            gx.ExpectationSuite(name="prepared_manifest", expectations=expectations))
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(data=batch, suite=suite, name="prepared_manifest"))
        outcome = validation.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "SUMMARY",
                           "partial_unexpected_count": _EXAMPLE_POOL * max_examples},
        )
        results = {r.expectation_config.meta["check"]: r for r in outcome.results}
    return [_to_check(s, results.get(s.name), frame, max_examples) for s in specs]


def _plain_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """Pandas string-dtype columns as object columns: GX checks str values one by one."""
    out = frame.copy(deep=False)
    for c in out.columns:
        if isinstance(out[c].dtype, pd.StringDtype):
            out[c] = out[c].astype(object)
    return out


def _to_check(spec: CheckSpec, result: Any, frame: pd.DataFrame, limit: int) -> CheckResult:
    if result is None:
        return CheckResult(spec.name, spec.group, spec.description, "skipped",
                           f"not evaluated: {_missing_inputs(spec, frame)}", spec.expected)
    status: Status = "passed" if result.success else "failed"
    info = result.exception_info or {}
    if info.get("raised_exception"):
        observed: Any = f"error: {info.get('exception_message')}"
        return CheckResult(spec.name, spec.group, spec.description, "failed", observed,
                           spec.expected)
    body = result.result or {}
    if "details" in body:
        observed = {"missing": _jsonable(body["details"].get("mismatched", {}).get("missing", []))}
    elif "observed_value" in body:
        observed = {"observed_value": _jsonable(body["observed_value"])}
    else:
        observed = {k: body[k] for k in ("unexpected_count", "element_count") if k in body}
    examples = [] if result.success else _examples(spec, body, frame, limit)
    return CheckResult(spec.name, spec.group, spec.description, status, observed,
                       spec.expected, examples)


def _missing_inputs(spec: CheckSpec, frame: pd.DataFrame) -> str:
    """Why a check could not run, named by the manifest columns (or folder) that are absent."""
    have = set(frame.columns) | ({IMAGE_FOLDER} if "image_exists" in frame.columns else set())
    roots: list[str] = []
    for col in spec.needs:
        if col in have:
            continue
        absent = [s for s in DERIVED_FROM.get(col, (col,)) if s not in have]
        roots += [s for s in absent if s not in roots]
    names = [r if r == IMAGE_FOLDER else f"column {r!r}" for r in roots]
    return "needs " + ", ".join(names) + " (unavailable)"


def _examples(spec: CheckSpec, body: dict[str, Any], frame: pd.DataFrame,
              limit: int) -> list[dict[str, Any]]:
    """Distinct failing rows (ignoring the row id) quoted from GX's unexpected index list."""
    index = body.get("partial_unexpected_index_list") or []
    column = spec.value or spec.kwargs.get("column")
    if not index or column is None or not all(isinstance(i, (int, np.integer)) for i in index):
        return [{"value": _jsonable(v)} for v in body.get("partial_unexpected_list", [])[:limit]]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i in index:
        row = frame.loc[i]
        quoted = {column: _jsonable(row.get(column))}
        quoted |= {c: _jsonable(row[c]) for c in spec.context if c in frame.columns}
        key = repr(sorted(quoted.items()))
        if key not in seen and len(out) < limit:
            seen.add(key)
            out.append({"row": row.get("row_id"), **quoted})
    return out


def _jsonable(value: Any) -> Any:
    """numpy / pandas scalars and arrays -> plain JSON-able Python (long strings cut)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and len(value) > 120:
        return value[:117] + "..."
    return value
