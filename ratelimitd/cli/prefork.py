"""What `serve --workers N` does once, in the supervisor, before it forks the workers.

Forked workers share the supervisor's memory pages until one writes to them. The tokenizer
tables (o200k_base ~74 MB, cl100k_base ~33 MB) are loaded here, once, so every worker finds
them in load_encoding's cache instead of loading its own copy; then the garbage collector's
objects are frozen (`gc.freeze()`): a collection in a worker then never walks, and so never
writes to, the objects inherited from the supervisor, and their pages stay shared. The figures
are in docs/performance.md.
"""

from __future__ import annotations

import gc

from ratelimitd.config import Config
from ratelimitd.tokenize import TokenCounter


def prepare_fork(config: Config) -> None:
    """Loads what every worker needs and freezes the collector's objects, before the fork."""
    TokenCounter(config.tokens.default_encoding, config.tokens.models)
    gc.collect()
    gc.freeze()
