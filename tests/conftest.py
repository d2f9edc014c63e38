import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import chisquare  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    # The false-failure budget in chisquare.py holds only if the suite stays within its plan.
    if chisquare.tests_run > chisquare.PLANNED_TESTS:
        print(
            f"\nERROR: the suite ran {chisquare.tests_run} chi-square tests, more than the "
            f"{chisquare.PLANNED_TESTS} planned in tests/chisquare.py; raise PLANNED_TESTS to keep "
            f"the family-wise false-failure rate at {chisquare.FAMILY_ALPHA}"
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
