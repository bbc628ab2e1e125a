"""Abuse defences around the reserve: blocks of subjects (blocks), the per-address count of
failed key lookups that blocks credential stuffing (stuffing), address handling (ip), and the
subjects whose blocks a reserve respects with the 403 a block answers (guards). lua/block.lua is
the reserve-side reader of a block (see blocks.py for the storage)."""

from ratelimitd.abuse.blocks import Block, BlockInputError, BlockStore, parse_block, subject_key
from ratelimitd.abuse.guards import block_guards, blocked_error
from ratelimitd.abuse.ip import (
    InvalidIpError,
    auth_failure_subject,
    canonical_ip,
    ip_block_subjects,
    ip_prefix,
)
from ratelimitd.abuse.stuffing import AuthFailureGuard, FailureOutcome

__all__ = [
    "AuthFailureGuard",
    "Block",
    "BlockInputError",
    "BlockStore",
    "FailureOutcome",
    "InvalidIpError",
    "auth_failure_subject",
    "block_guards",
    "blocked_error",
    "canonical_ip",
    "ip_block_subjects",
    "ip_prefix",
    "parse_block",
    "subject_key",
]
