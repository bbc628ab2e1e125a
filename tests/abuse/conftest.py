from __future__ import annotations

from tests.keys.conftest import pepper, second_client

__all__ = ["pepper", "second_client"]
