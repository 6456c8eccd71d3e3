"""Blocking data checks on `prepared_splits`, built from the great-expectations suite.

`data_checks.validate_prepared` runs once; each expectation group (files, columns, splits,
sentences, masks, boxes, images) becomes one blocking AssetCheckResult, so a failure stops
the features and training downstream in the same run. Metadata: actual and expected values
of every expectation in the group, and a few failing rows.
"""

from collections.abc import Iterator

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    MetadataValue,
    multi_asset_check,
)

from cris_model.params import section
from data_checks import CheckResult, ValidationConfig, check_specs, validate_prepared
from pipelines.defs.assets import PREPARED, prepared_splits
from pipelines.defs.resources import ParamsResource, StorageResource

FILES_GROUP = "files"  # folder-level checks (summary, manifests, image folder) of data_checks
CHECK_GROUPS = tuple(sorted({FILES_GROUP} | {s.group for s in check_specs()}))


def group_result(group: str, checks: list[CheckResult]) -> AssetCheckResult:
    """One blocking result for the expectations of `group`: passed unless any of them failed."""
    failed = [c.name for c in checks if c.status == "failed"]
    examples = {c.name: c.examples for c in checks if c.status == "failed" and c.examples}
    return AssetCheckResult(
        check_name=f"data_{group}", passed=not failed, severity=AssetCheckSeverity.ERROR,
        description=f"{len(checks) - len(failed)} of {len(checks)} {group} expectations hold",
        metadata={
            "actual": MetadataValue.json({c.name: c.observed for c in checks}),
            "expected": MetadataValue.json({c.name: c.expected for c in checks}),
            "status": MetadataValue.json({c.name: c.status for c in checks}),
            "failed": MetadataValue.json(failed),
            "examples": MetadataValue.json(examples),
        },
    )


@multi_asset_check(
    specs=[AssetCheckSpec(f"data_{g}", asset=prepared_splits, blocking=True,
                          description=f"great-expectations: the {g} expectations of the manifests")
           for g in CHECK_GROUPS],
)
def prepared_data_checks(
    context: AssetCheckExecutionContext, params: ParamsResource, storage: StorageResource
) -> Iterator[AssetCheckResult]:
    """Validate the prepared folder once and yield one result per expectation group."""
    word_len = int(section(params.load(), "model").get("word_len", ValidationConfig.word_len))
    report = validate_prepared(storage.path(PREPARED), ValidationConfig(word_len=word_len))
    context.log.info(report.render())
    for group in CHECK_GROUPS:
        yield group_result(group, [c for c in report.checks if c.group == group])
