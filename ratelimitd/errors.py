"""The one error every endpoint answers with: {"error": {"code", "message"}}."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def invalid(field: str, problem: str, code: str = "invalid_request") -> ApiError:
    """A 400 that names the field at fault."""
    return ApiError(400, code, f"{field}: {problem}")
