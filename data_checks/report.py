"""Results of a validation run: one `CheckResult` per expectation, gathered in a report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["passed", "failed", "skipped"]


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one named check (a great-expectations expectation or a folder check).

    `observed` and `expected` are JSON-able; `examples` quotes up to a few failing rows as
    dicts (row id, the offending value, context columns). A check is `skipped` when what it
    needs is absent (say a missing column); that is reported by another, failed, check.
    """

    name: str  # stable id, e.g. "sentence_within_token_limit"
    group: str  # files | columns | splits | sentences | masks | boxes | images
    description: str  # one line: what must hold
    status: Status
    observed: Any = None  # what was found, e.g. {"unexpected_count": 3, "element_count": 120}
    expected: Any = None  # what should be found, e.g. "<= 77 tokens"
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few failing rows

    @property
    def success(self) -> bool:
        """True only when the check ran and passed."""
        return self.status == "passed"

    def metadata(self) -> dict[str, Any]:
        """JSON-able dict for a Dagster AssetCheckResult: actual, expected, examples, ..."""
        return {
            "actual": self.observed,
            "expected": self.expected,
            "examples": self.examples,
            "status": self.status,
            "description": self.description,
        }


@dataclass
class ValidationReport:
    """All checks of one prepared folder, plus informational figures (never failures)."""

    folder: Path
    checks: list[CheckResult]
    info: dict[str, Any] = field(default_factory=dict)  # row counts, truncation, timings
    seconds: float = 0.0  # wall time of the whole validation

    @property
    def success(self) -> bool:
        """True when every check ran and passed."""
        return bool(self.checks) and all(c.success for c in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        """Checks that ran and failed."""
        return [c for c in self.checks if c.status == "failed"]

    def check(self, name: str) -> CheckResult:
        """The check called `name` (KeyError naming it when absent)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able data."""
        return {
            "folder": str(self.folder),
            "success": self.success,
            "seconds": round(self.seconds, 3),
            "info": self.info,
            "checks": [{"name": c.name, "group": c.group, **c.metadata()} for c in self.checks],
        }

    def render(self) -> str:
        """A readable multi-line report: one line per check, failures with examples."""
        lines = [f"Validation of {self.folder}"]
        lines += [f"  {k}: {_short(v)}" for k, v in self.info.items()]
        width = max((len(c.name) for c in self.checks), default=0)
        for c in self.checks:
            tag = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[c.status]
            lines.append(f"{tag}  {c.name:<{width}}  {c.description}")
            if c.status == "passed":
                continue
            lines.append(f"      observed: {_short(c.observed)}")
            lines.append(f"      expected: {_short(c.expected)}")
            lines += [f"      e.g. {_short(ex)}" for ex in c.examples]
        n_failed = len(self.failed)
        n_skipped = sum(c.status == "skipped" for c in self.checks)
        verdict = "PASSED" if self.success else "FAILED"
        lines.append(
            f"{verdict}: {len(self.checks) - n_failed - n_skipped} passed, {n_failed} failed, "
            f"{n_skipped} skipped, in {self.seconds:.2f} s"
        )
        return "\n".join(lines)


def _short(value: Any, limit: int = 300) -> str:
    """One-line JSON-ish text of a value, cut to `limit` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
