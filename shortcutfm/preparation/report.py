"""What a prepare run reports: counts, and every input that could not be prepared with the fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class FailedInput:
    path: str  # the file (relative to the folder) that could not be prepared
    reason: str  # what is wrong with it and how to fix it


@dataclass
class PreparationReport:
    """What one prepare run did."""

    out_dir: Path
    added: int = 0  # records encoded and cached by this run
    already_cached: int = 0  # inputs skipped because a record with their content key was cached
    failed: list[FailedInput] = field(default_factory=list)  # inputs that could not be prepared
    num_records: int = 0  # records in the cache after this run

    def summary(self) -> str:
        lines = [f"{self.out_dir}: {self.added} records added, {self.already_cached} already cached, "
                 f"{len(self.failed)} failed; the cache holds {self.num_records} records"]
        lines += [f"  {failure.path}: {failure.reason}" for failure in self.failed]
        return "\n".join(lines)


class PreparationError(RuntimeError):
    """Some inputs could not be prepared; every good one is cached. ``report`` lists the failures."""

    def __init__(self, report: PreparationReport):
        self.report = report
        super().__init__(
            f"{len(report.failed)} input(s) could not be prepared; every good one is cached ({report.num_records} "
            f"records in {report.out_dir}). Fix these and re-run (only they will be encoded), or pass "
            "on_error='skip':\n"
            + "\n".join(f"  {failure.path}: {failure.reason}" for failure in report.failed)
        )
