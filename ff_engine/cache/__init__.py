"""Paged KV cache: vLLM's block pool for pages, our canonical storage, page tables and token metadata."""

from ff_engine.cache.page_pool import PagePool
from ff_engine.cache.page_summaries import PageSummaries
from ff_engine.cache.paged_kv_cache import (
    CacheView,
    KVStorage,
    LayerPageTable,
    PagedKVCache,
    SessionCacheView,
    StorageListener,
)

__all__ = [
    "CacheView",
    "KVStorage",
    "LayerPageTable",
    "PagePool",
    "PageSummaries",
    "PagedKVCache",
    "SessionCacheView",
    "StorageListener",
]
