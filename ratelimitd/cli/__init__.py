"""The `ratelimitd` command: serve and check-config (main.py), the operator's key and block
commands (admin.py), the usage table (usage_report.py), and what `serve --workers N` does once
before it forks (prefork.py)."""

from ratelimitd.cli.main import main

__all__ = ["main"]
