"""KV cache of the causal student: keys and values of earlier latent frames, per layer.

Keys are stored after RoPE at their absolute frame positions, so nothing is rotated twice and the
window can slide forever. `KVCache`, the default, stores a dict from frame index to that frame's K/V,
per layer:
* writing a block's frames again replaces them (the step-first order rewrites context every step);
* nothing is written in place, so a cache read under autograd can never be invalidated later;
* a frame owns its memory: K/V written from part of a longer forward are copied out of it;
* after each write, frames that no later block can see (outside every future window and not in the
  sink) are dropped, so memory stays at most one window of frames however long the video runs.

`StaticKVCache` (runtime.kv_cache=static) keeps the same frames in preallocated per-layer buffers
written in place, so once the window is full every forward attends to views of one shape instead of
a concatenated copy of its context. In-place writes would invalidate what a pending backward saved,
so it serves forwards without grad only, and refuses others. Both give the same K/V in the same
order: the same videos.

A cached forward uses either through three calls: `snapshot` when it starts (a missing frame raises
CacheMissError before any compute), `with_context` per layer (the context K/V, then the call's own),
and `write` per layer after its attention.
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

    def snapshot(self, frames: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per layer, the stored (k, v) of `frames` (`entries`): a forward takes them when it starts."""
        return [self.entries(layer, frames) for layer in range(self.num_layers)]

    def with_context(self, layer: int, context: list[tuple[torch.Tensor, torch.Tensor]], k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, (C + F) * T, H, D]: the snapshot's C frames in order, then the call's k, v [B, F, T, H, D]."""
        k, v = k.flatten(1, 2), v.flatten(1, 2)
        if not context:
            return k, v
        keys, values = zip(*context)
        return torch.cat([*keys, k], dim=1), torch.cat([*values, v], dim=1)

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


class StaticKVCache:
    """The KV cache in preallocated buffers (module docstring): inference only.

    Per layer, K and V live in buffers [B, S * T, H, D] of S frame slots. The held frames fill the first
    slots in increasing order, the order a forward attends to them. A forward whose context is exactly
    the held frames (every call of the sampling orders: eviction keeps what the next block sees) puts
    its own K/V in the slots after them and attends to one view of the buffer; a write of frames after
    the held ones goes to those slots too, and eviction moves the survivors down over the freed slots.
    Any other read or write (a rewrite of an earlier block, a context narrower than what is held) works
    on copies.

    S grows only when a call needs more slots: with a window W it starts at the most context a block
    sees (W - k frames) plus the call, after which shapes stay fixed; unbounded, it doubles.
    """

    def __init__(self, num_layers: int, window: BlockCausalWindow):
        self.window = window
        self._frames: list[list[int]] = [[] for _ in range(num_layers)]  # per layer: held frames, slot order
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self._frames)

    def frames(self, layer: int = 0) -> list[int]:
        return list(self._frames[layer])

    def copy(self) -> StaticKVCache:
        """A cache holding the same frames in buffers of its own (these are written in place)."""
        twin = StaticKVCache(self.num_layers, self.window)
        twin._frames = [list(held) for held in self._frames]
        twin._buffers = [None if kv is None else (kv[0].clone(), kv[1].clone()) for kv in self._buffers]
        return twin

    def clear(self) -> None:
        for held in self._frames:
            held.clear()

    def nbytes(self) -> int:
        """Bytes of the buffers, held slots or not."""
        return sum(t.nbytes for kv in self._buffers if kv is not None for t in kv)

    def snapshot(self, frames: list[int]) -> list[list[int]]:
        """Check, when a forward starts, that every layer holds `frames`; per layer, the frames it reads."""
        if torch.is_grad_enabled():
            raise RuntimeError("runtime.kv_cache=static writes K/V in place, which a backward could not survive: "
                               "run cached forwards under torch.no_grad(), or use runtime.kv_cache=dict")
        for layer, held in enumerate(self._frames):
            missing = sorted(set(frames) - set(held))
            if missing:
                span = f"{held[0]}..{held[-1]}" if held else "nothing"
                raise CacheMissError(f"KV cache layer {layer} lacks context frames {missing[:6]} (holds {span}); "
                                     "write each block before the blocks after it read it")
        return [list(frames) for _ in self._frames]

    def with_context(self, layer: int, context: list[int], k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, (C + F) * T, H, D] of the context frames in order, then the call's k, v [B, F, T, H, D]."""
        held, tokens = self._frames[layer], k.shape[2]
        if context == held:
            buffers = self._put_after_held(layer, k, v)
            end = (len(held) + k.shape[1]) * tokens
            return buffers[0][:, :end], buffers[1][:, :end]
        own = k.flatten(1, 2), v.flatten(1, 2)  # an irregular read: a copy
        if not context:
            return own
        stored = self._slots(layer, [held.index(f) for f in context], tokens)
        return tuple(torch.cat([s, o], dim=1) for s, o in zip(stored, own))

    def write(self, layer: int, start_frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V [B, n, T, H, D] of frames start_frame .. start_frame + n - 1, then evict."""
        held, n, tokens = self._frames[layer], k.shape[1], k.shape[2]
        if not held or start_frame > held[-1]:  # new frames after the held ones (a read put them there too)
            self._put_after_held(layer, k, v)
            held.extend(range(start_frame, start_frame + n))
        else:  # rebuild the held frames in order, the written ones replaced or added
            stored = self._slots(layer, list(range(len(held))), tokens) if held else None
            per_frame = {f: tuple(t[:, i * tokens:(i + 1) * tokens] for t in stored) for i, f in enumerate(held)}
            per_frame.update({start_frame + i: (k[:, i], v[:, i]) for i in range(n)})
            buffers = self._reserve(layer, len(per_frame), k)
            held[:] = sorted(per_frame)
            for part, buffer in enumerate(buffers):
                buffer[:, :len(held) * tokens].copy_(torch.cat([per_frame[f][part] for f in held], dim=1))
        self._evict(layer, next_frame=start_frame + n, tokens=tokens)

    def _put_after_held(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy k, v [B, F, T, H, D] into the F slots after the held frames; returns the buffers."""
        used, tokens = len(self._frames[layer]), k.shape[2]
        buffers = self._reserve(layer, used + k.shape[1], k)
        for buffer, new in zip(buffers, (k, v)):
            buffer[:, used * tokens:(used + k.shape[1]) * tokens].copy_(new.flatten(1, 2))
        return buffers

    def _slots(self, layer: int, slots: list[int], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the K and V in frame `slots`, in order: [B, len(slots) * T, H, D] each."""
        index = (torch.tensor(slots)[:, None] * tokens + torch.arange(tokens)).flatten()
        return tuple(t.index_select(1, index.to(t.device)) for t in self._buffers[layer])

    def _reserve(self, layer: int, slots: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's buffers with at least `slots` frame slots for K/V like `like` [B, F, T, H, D];
        growing keeps the held frames."""
        b, _, tokens, heads, dim = like.shape
        current = self._buffers[layer]
        have = 0 if current is None else current[0].shape[1] // tokens
        if have >= slots:
            return current
        if self.window.window_frames:  # the most context a block sees, plus this call
            grown = max(slots, self.window.window_frames - self.window.frames_per_block + like.shape[1])
        else:
            grown = max(slots, 2 * have)
        buffers = (like.new_empty(b, grown * tokens, heads, dim), like.new_empty(b, grown * tokens, heads, dim))
        if current is not None:
            used = len(self._frames[layer]) * tokens
            for buffer, old in zip(buffers, current):
                buffer[:, :used].copy_(old[:, :used])
        self._buffers[layer] = buffers
        return buffers

    def _evict(self, layer: int, next_frame: int, tokens: int) -> None:
        """Drop frames that the block starting at `next_frame` cannot see; the survivors move down to the
        first slots, in order (one gathered copy: a slid window overlaps where it came from)."""
        held = self._frames[layer]
        alive = self.window.frame_mask(torch.tensor([next_frame]), torch.tensor(held, dtype=torch.long))[0].tolist()
        kept = [slot for slot, keep in enumerate(alive) if keep]
        if kept != list(range(len(kept))):
            for buffer, survivors in zip(self._buffers[layer], self._slots(layer, kept, tokens)):
                buffer[:, :survivors.shape[1]].copy_(survivors)
        held[:] = [held[slot] for slot in kept]
