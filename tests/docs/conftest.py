from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The count of doc examples that ran and passed, by page."""
    ran = [report.nodeid.partition("test_example[")[2].rstrip("]")
           for report in terminalreporter.stats.get("passed", [])
           if "tests/docs/test_examples.py::test_example[" in report.nodeid]
    if ran:
        pages = sorted({block.rpartition(":")[0] for block in ran})
        terminalreporter.write_line(f"docs: {len(ran)} examples executed ({', '.join(pages)})")
