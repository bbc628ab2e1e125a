"""Who is calling, and may they: bearer tokens (bearer.py: service and admin tokens), API keys
(keys/), request signatures (signatures.py) and the caller they resolve to (caller.py).

services.py builds the Redis-backed parts from the configuration (`Access`, one per daemon
process); caller.py turns a reserve's `api_key`, `signature` and `attributes.ip` into the
identity to reserve for, or into the API's 401/403/503 answer. Abuse defences (blocks, the
credential-stuffing count) are abuse/'s. Redis failures of these libraries come out as
StoreUnavailable, as the engine's do, so the HTTP layer answers them the same way (503) and
never sees a Redis exception.
"""

from ratelimitd.auth.caller import Caller, identify
from ratelimitd.auth.services import Access, open_access

__all__ = ["Access", "Caller", "identify", "open_access"]
