"""Abuse defences around the reserve: blocks of subjects (blocks), the per-address count of
failed key lookups that blocks credential stuffing (stuffing), and address handling (ip).
block.lua is the reserve-side reader of a block (see blocks.py for the storage)."""

from ratelimitd.guard.blocks import Block, BlockInputError, BlockStore, parse_block, subject_key
from ratelimitd.guard.ip import (
    InvalidIpError,
    auth_failure_subject,
    canonical_ip,
    ip_block_subjects,
    ip_prefix,
)
from ratelimitd.guard.stuffing import AuthFailureGuard, FailureOutcome

__all__ = [
    "AuthFailureGuard", "Block", "BlockInputError", "BlockStore", "FailureOutcome",
    "InvalidIpError", "auth_failure_subject", "canonical_ip", "ip_block_subjects", "ip_prefix",
    "parse_block", "subject_key",
]
