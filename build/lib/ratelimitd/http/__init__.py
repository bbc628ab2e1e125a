"""The HTTP API on aiohttp: app.py (the application, its routes and probes), edge.py (error
shape, service tokens, bodies), decisions.py (reserve, commit, release), answers.py and
headers.py (what they answer), schema.py (what they accept), openapi.py (the description)."""

from ratelimitd.http.app import create_app

__all__ = ["create_app"]
