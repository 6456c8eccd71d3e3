"""Great-expectations suites over prepared manifests and their images.

`validate_prepared(D)` checks a folder written by `cris data prepare` and returns a
`ValidationReport` whose `checks` (one `CheckResult` per expectation: name, status, observed,
expected, examples) back both `cris data validate` and the Dagster asset checks.
"""

from data_checks.config import ValidationConfig
from data_checks.report import CheckResult, ValidationReport
from data_checks.suite import CheckSpec, check_specs
from data_checks.validate import validate_prepared

__all__ = [
    "CheckResult", "CheckSpec", "ValidationConfig", "ValidationReport", "check_specs",
    "validate_prepared",
]
