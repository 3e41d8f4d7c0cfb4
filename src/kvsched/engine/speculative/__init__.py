"""Speculative decoding in the engine: proposers (prompt lookup, a draft model with its own KV cache),
verification in one target forward, and the rewind of both caches (see speculator.py)."""

from kvsched.core.scheduler.draft_mirror import BothCaches
from kvsched.engine.speculative.draft_model import DraftModelProposer, truncated_copy
from kvsched.engine.speculative.proposers import NgramProposer, Proposal, Proposer
from kvsched.engine.speculative.speculator import Speculator
from kvsched.engine.speculative.verify import processed_probs, verify_greedy, verify_sampled

__all__ = [
    "BothCaches",
    "DraftModelProposer",
    "NgramProposer",
    "Proposal",
    "Proposer",
    "Speculator",
    "processed_probs",
    "truncated_copy",
    "verify_greedy",
    "verify_sampled",
]
