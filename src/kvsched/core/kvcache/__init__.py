"""The paged, tiered KV-cache manager (torch-free; ``tensor_storage`` is the one module using torch)."""

from kvsched.core.kvcache.manager import KVCacheManager
from kvsched.core.kvcache.storage import KVStorage, MetadataStorage
from kvsched.core.kvcache.types import KVCacheStats, KVEvent, Tier

__all__ = ["KVCacheManager", "KVCacheStats", "KVEvent", "KVStorage", "MetadataStorage", "Tier"]
