"""The Wan DiT, its attention modes, the block-causal window rule and the KV cache."""

from hiar.models.attention import AttentionMode, Bidirectional, BlockCausal, Cached
from hiar.models.cache import CacheMissError, KVCache, StaticKVCache
from hiar.models.wan import WanModel
from hiar.models.window import BlockCausalWindow

__all__ = ["AttentionMode", "Bidirectional", "BlockCausal", "BlockCausalWindow", "Cached", "CacheMissError",
           "KVCache", "StaticKVCache", "WanModel"]
