"""Capacity policies of the two-stage (V1) baseline."""

from __future__ import annotations

from enum import Enum

from kvsched.core.errors import ConfigError


class CapacityPolicy(Enum):
    """How the two-stage capacity stage decides which requests fit in KV memory."""

    GUARANTEED_NO_EVICT = "guaranteed_no_evict"
    MAX_UTILIZATION = "max_utilization"
    STATIC_BATCH = "static_batch"

    @classmethod
    def parse(cls, value: CapacityPolicy | str) -> CapacityPolicy:
        """Accept a member or its lowercase name (``"max_utilization"``; dashes allowed)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            for member in cls:
                if member.value == key:
                    return member
        names = ", ".join(m.value for m in cls)
        raise ConfigError(f"policy={value!r} is invalid: must be a CapacityPolicy or one of {names}")
