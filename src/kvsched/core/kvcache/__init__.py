"""The paged, tiered KV-cache manager (torch-free; the tensor backend is ``kvsched.engine.kv_storage``)."""

from kvsched.core.kvcache.manager import KVCacheManager
from kvsched.core.kvcache.storage import KVStorage, MetadataStorage
from kvsched.core.kvcache.types import KVCacheStats, KVEvent, Tier

__all__ = ["KVCacheManager", "KVCacheStats", "KVEvent", "KVStorage", "MetadataStorage", "Tier"]
