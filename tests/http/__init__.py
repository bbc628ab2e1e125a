"""The HTTP API over real sockets against a real Redis.

Each test serves `create_app(config, redis_url)` on a localhost TCP port (pytest-aiohttp) and
talks to it with a real HTTP client; Redis is the session's redis-server, flushed per test.
Nothing of Redis or of ratelimitd is mocked.
"""
