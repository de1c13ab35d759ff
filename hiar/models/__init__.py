"""The Wan DiT and its KV cache."""

from hiar.models.attention import AttentionMode, Bidirectional, BlockCausal, BlockCausalWindow, Cached
from hiar.models.cache import CacheMissError, KVCache
from hiar.models.wan import WanModel

__all__ = ["AttentionMode", "Bidirectional", "BlockCausal", "BlockCausalWindow", "Cached", "CacheMissError",
           "KVCache", "WanModel"]
