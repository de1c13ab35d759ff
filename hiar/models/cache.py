"""KV cache of the causal student: keys and values of earlier latent frames, per layer.

Keys are stored after RoPE at their absolute frame positions, so nothing is rotated twice and the
window can slide forever. Storage is a dict from frame index to that frame's K/V, per layer:
* writing a block's frames again replaces them (the step-first order rewrites context every step);
* nothing is written in place, so a cache read under autograd can never be invalidated later;
* a frame owns its memory: K/V written from part of a longer forward are copied out of it;
* after each write, frames that no later block can see (outside every future window and not in the
  sink) are dropped, so memory stays at most one window of frames however long the video runs.
"""

from __future__ import annotations

import torch

from hiar.models.window import BlockCausalWindow


class CacheMissError(LookupError):
    """A cached call needs a context frame that was never written or was already evicted."""


class KVCache:
    def __init__(self, num_layers: int, window: BlockCausalWindow):
        self.window = window
        self._layers: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(num_layers)]

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def frames(self, layer: int = 0) -> list[int]:
        """Frame indices currently held for `layer`, in order."""
        return sorted(self._layers[layer])

    def copy(self) -> KVCache:
        """A cache holding the same frames; the tensors are shared, which is safe as none is ever
        modified in place."""
        twin = KVCache(self.num_layers, self.window)
        twin._layers = [dict(store) for store in self._layers]
        return twin

    def clear(self) -> None:
        for store in self._layers:
            store.clear()

    def nbytes(self) -> int:
        """Bytes of memory the held K/V keep alive (each storage once: a block's frames share one)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for store in self._layers for kv in store.values() for t in kv}
        return sum(storages.values())

    def entries(self, layer: int, frames: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The stored (k, v) [B, T, H, D] of each of `frames`, in order: the cache's own tensors, not
        copies. Holding them keeps exactly those frames as they are now, whatever is later replaced or
        evicted (a forward snapshots its context this way, so a recompute in backward reads the same)."""
        store = self._layers[layer]
        missing = [f for f in frames if f not in store]
        if missing:
            held = self.frames(layer)
            span = f"{held[0]}..{held[-1]}" if held else "nothing"
            raise CacheMissError(f"KV cache layer {layer} lacks context frames {missing[:6]} (holds {span}); "
                                 "write each block before the blocks after it read it")
        return [store[f] for f in frames]

    def read(self, layer: int, frames: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `frames` concatenated in order: [B, len(frames) * T, H, D] each."""
        keys, values = zip(*self.entries(layer, frames))
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)

    def write(self, layer: int, start_frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V [B, n, T, H, D] of frames start_frame .. start_frame + n - 1, then evict."""
        store = self._layers[layer]
        if k.untyped_storage().nbytes() > k.nbytes:
            # A view into a longer forward's K/V (a fused forward: written frames + denoised block):
            # keep only these frames, or the cache would hold the whole forward's K/V alive (2x memory).
            k, v = k.clone(), v.clone()
        for i, (k_frame, v_frame) in enumerate(zip(k.unbind(1), v.unbind(1))):
            store[start_frame + i] = (k_frame, v_frame)
        self._evict(store, next_frame=start_frame + k.shape[1])

    def _evict(self, store: dict, next_frame: int) -> None:
        """Drop frames that the block starting at `next_frame`, hence every later block, cannot see."""
        held = torch.tensor(sorted(store))
        query = torch.tensor([next_frame])
        dead = held[~self.window.frame_mask(query, held)[0]]
        for f in dead.tolist():
            del store[f]
