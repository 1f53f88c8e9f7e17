"""The mutation fuzzer (tests/security/fuzz.py) as a test: a short run in the default suite, a long
one under ``-m fuzz``. The parent never crashes; every refusal is one line; every internal error
names the component it came from and leaves a reproducer; detc itself has none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.security.fuzz import FuzzReport, fuzz

#: seconds of the default suite's run, and of the -m fuzz run (DETC_FUZZ_SECONDS overrides)
SHORT_RUN_S = 20.0
LONG_RUN_S = float(os.environ.get("DETC_FUZZ_SECONDS", "900"))


def _check(report: FuzzReport, findings: Path) -> None:
    print(report.summary())
    assert report.cases > 0
    codes = {outcome.split()[-1] for outcome in report.outcomes if " " in outcome}
    assert codes <= {"0", "2", "3", "4"}, report.outcomes
    assert report.untidy == [], "refusals that were not one line:\n" + "\n".join(report.untidy)
    for finding in report.findings:
        assert finding.reproducer.is_file() and finding.reproducer.with_suffix(".txt").is_file()
        assert finding.component, finding
    detc_bugs = [f for f in report.findings if f.component == "detc"]
    assert detc_bugs == [], (
        f"internal errors of detc itself (reproducers in {findings}): {detc_bugs}"
    )


def test_mutants_never_crash_detc_and_are_refused_in_one_line(tmp_path: Path) -> None:
    findings = tmp_path / "findings"
    _check(fuzz(SHORT_RUN_S, findings, seed=0), findings)


@pytest.mark.fuzz
@pytest.mark.slow
def test_a_long_fuzzing_run(tmp_path: Path) -> None:
    findings = Path(os.environ.get("DETC_FUZZ_FINDINGS", tmp_path / "findings"))
    _check(fuzz(LONG_RUN_S, findings, seed=int(os.environ.get("DETC_FUZZ_SEED", "1"))), findings)
