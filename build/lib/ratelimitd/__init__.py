"""ratelimitd: rate-limit and budget decisions for LLM APIs."""

__version__ = "0.1.0"
