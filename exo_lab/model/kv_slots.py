"""KV slots: one stage's whole KV cache, preallocated at load, one slot per running sequence.

The planner reserves ``max_batch x max_context`` tokens of KV per layer; this is that memory,
allocated once (zeros, so masked positions are finite) and never grown, so a stage's memory is
known and flat. The coordinator owns the slot numbers: a request keeps its slot on every stage
for as long as it runs, and a later request may reuse the KV its tokens left behind (prefix
reuse).

A step binds B rows (their slots, and each row's positions for its T new tokens); each decoder
layer's attention then calls :meth:`SlotCache.update`, which writes the step's keys and values
at those positions and returns every row's keys and values up to the longest row, to be read
under the step's mask (:meth:`SlotCache.mask`).
"""
from __future__ import annotations

import torch


class SlotCache:
    """Keys and values of ``num_layers`` layers for ``num_slots`` sequences x ``max_context``
    positions: per layer two tensors of shape (slots, kv_heads, max_context, head_dim)."""

    def __init__(self, *, num_layers: int, num_slots: int, max_context: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (num_slots, kv_heads, max_context, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_context = max_context
        self._rows: torch.Tensor | None = None       # (B, T) slot of each new token
        self._columns: torch.Tensor | None = None    # (B, T) its position
        self._slots: torch.Tensor | None = None      # (B,)
        self._slice: slice | None = None             # the rows as a slice when their slots are consecutive
        self._length = 0                             # keys each row attends over: the longest row
        self._single: tuple[int, int] | None = None  # (slot, position) of a one-row, one-token step

    @classmethod
    def for_config(cls, config, num_layers: int, num_slots: int, max_context: int, dtype, device) -> "SlotCache":
        """A cache shaped for a Hugging Face decoder config (its KV heads and head size)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(num_layers=num_layers, num_slots=num_slots, max_context=max_context, kv_heads=kv_heads,
                   head_dim=head_dim, dtype=dtype, device=device)

    def nbytes(self) -> int:
        """Bytes of every key and value tensor: the stage's whole, flat KV memory."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def bind(self, slots: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Set the step's rows: ``slots`` (B,) and each new token's position ``position_ids`` (B, T)."""
        B, T = position_ids.shape
        self._slots = slots
        self._rows = slots[:, None].expand(B, T)
        self._columns = position_ids
        self._length = int(position_ids.max()) + 1
        first = int(slots[0])
        consecutive = bool(torch.equal(slots, torch.arange(first, first + B, device=slots.device)))
        self._slice = slice(first, first + B) if consecutive else None
        self._single = (first, int(position_ids[0, 0])) if B == 1 and T == 1 else None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **kwargs):
        """Write this step's key/value (B, kv_heads, T, head_dim) into the rows' slots; return
        the rows' keys and values over positions [0, longest row) (B, kv_heads, L, head_dim)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._single is not None:      # one row, one token (decode): a plain copy, no index_put
            slot, position = self._single
            keys[slot, :, position].copy_(key[0, :, 0])
            values[slot, :, position].copy_(value[0, :, 0])
        else:
            # index (B, T) on dims 0 and 2 selects (B, T, heads, head_dim): hence the transposes
            keys[self._rows, :, self._columns] = key.transpose(1, 2).to(keys.dtype)
            values[self._rows, :, self._columns] = value.transpose(1, 2).to(values.dtype)
        if self._slice is not None:   # consecutive slots: a view, no copy
            return keys[self._slice, :, :self._length], values[self._slice, :, :self._length]
        return keys[self._slots, :, :self._length], values[self._slots, :, :self._length]

    def mask(self, position_ids: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
        """The step's attention mask (B, 1, T, L) in the cache's dtype, 0 where a query may attend
        (its own sequence's positions up to its own, and within the window for a sliding layer)
        and -inf elsewhere. Additive rather than boolean because SDPA turns a boolean mask into
        this on every call: built once per step, it saves each layer a conversion (measured:
        ~1.4 ms of a 30-layer decode step)."""
        keys = torch.arange(self._length, device=position_ids.device)            # (L,)
        query = position_ids[:, None, :, None]                                    # (B, 1, T, 1)
        allowed = keys <= query
        if sliding_window is not None:
            allowed &= keys > query - sliding_window
        blocked = torch.zeros(allowed.shape, dtype=self.keys[0].dtype, device=allowed.device)
        return blocked.masked_fill_(~allowed, float("-inf"))
