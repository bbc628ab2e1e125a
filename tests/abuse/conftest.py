from __future__ import annotations

from tests.auth.conftest import pepper, second_client

__all__ = ["pepper", "second_client"]
