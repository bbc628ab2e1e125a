"""Who is calling, and may they: the request-side use of keys/, signing.py and guard/.

services.py builds them from the configuration (`Access`, one per daemon process); caller.py
turns a reserve's `api_key`, `signature` and `attributes.ip` into the identity to reserve for,
or into the API's 401/403/503 answer; guards.py names the subjects whose blocks a reserve must
respect. Redis failures of these libraries come out as StoreUnavailable, as the engine's do, so
the HTTP layer answers them the same way (503) and never sees a Redis exception.
"""

from ratelimitd.access.caller import Caller, identify
from ratelimitd.access.guards import block_guards, blocked_error
from ratelimitd.access.services import Access, open_access, redis_failures

__all__ = ["Access", "Caller", "block_guards", "blocked_error", "identify", "open_access",
           "redis_failures"]
