"""pytest hooks for --fail-on-skip (`make test` passes it): a run where any test or test file was skipped, e.g.
for a missing test dependency, fails instead of passing quietly. tests/conftest.py imports them."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--fail-on-skip", action="store_true",
                     help="exit non-zero if any test or test file was skipped (`make test`: a missing test "
                          "dependency must not pass silently)")


_SKIPPED = []


def pytest_collectreport(report):
    if report.skipped:  # a whole file, e.g. pytest.importorskip at module level
        _SKIPPED.append(report.nodeid)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--fail-on-skip") and _SKIPPED and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    if config.getoption("--fail-on-skip") and _SKIPPED:
        terminalreporter.write_line(f"--fail-on-skip: {len(_SKIPPED)} skipped, which fails the run: "
                                    + ", ".join(sorted(set(_SKIPPED))), red=True)
