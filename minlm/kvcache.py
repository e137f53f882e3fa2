"""The decoding cache: keys and values of every attention layer, recurrent states of the rest.

Incremental decoding runs the prompt once (prefill) and then one token per step; without a
cache every step would recompute the keys and values of the whole context. ``LM.forward``
takes a ``KVCache`` and hands block ``i`` its per-layer view ``cache.layer(i)``:

- attention calls ``update(k, v, positions, key_valid)``: the new keys/values are written into
  a buffer allocated once for ``max_len`` slots, and the layer attends to all slots so far;
- a recurrent mixer (the MLGRU, Mamba, Griffin) reads and writes the view's ``state``
  attribute instead (any object: a tensor, or a tuple of them).

Rows of a batch may be left-padded: ``positions`` (B, T) give each row its own positions and
``key_valid`` marks real tokens (pad slots are never attended to). Positions and validity are
shared by all layers, so they are stored once, on the cache.

Dimension letters: B batch, K key/value heads, L slots (``max_len``), S slots in use,
T new tokens, D head size.
"""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's part of a ``KVCache``: K/V buffers (allocated on first use) and ``state``."""

    def __init__(self, parent: KVCache):
        self.parent = parent
        self.k: torch.Tensor | None = None  # (B, K, L, D)
        self.v: torch.Tensor | None = None
        self.state = None  # a recurrent mixer's state after the last token, e.g. (B, C)
        self._slots: dict[int, LayerCache] = {}  # further mixers of the same layer

    def slot(self, i: int) -> LayerCache:
        """The cache of the layer's mixer number ``i`` (0: this one); a layout with two mixers
        in one layer gives each its own keys/values or state."""
        if i == 0:
            return self
        if i not in self._slots:
            self._slots[i] = LayerCache(self.parent)
        return self._slots[i]

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               key_valid: torch.Tensor | None = None):
        """Store this call's keys/values (B, K, T, D) after the cached ones.

        Returns ``(k_all, v_all, k_pos, key_valid_all)``: (B, K, S, D) views of the buffers,
        key positions (S,) or (B, S), and validity (B, S), or None while no slot is padding.
        ``key_valid`` may cover every slot (B, S) or only the new tokens (B, T).
        """
        c = self.parent
        B, K, T, D = k.shape
        start, end = c.length, c.length + T
        if end > c.max_len:
            raise ValueError(f"the KV cache holds {c.max_len} tokens and is full: {start} cached "
                             f"+ {T} new; allocate it with a larger max_len")
        if self.k is None:  # values may have their own head count and size (differential attn)
            self.k = k.new_zeros(B, K, c.max_len, D)  # (B, K, L, D)
            self.v = v.new_zeros(B, v.shape[1], c.max_len, v.shape[-1])
        self.k.narrow(2, start, T).copy_(k)  # narrow: one op, no indexing to parse
        self.v.narrow(2, start, T).copy_(v)
        c._record(positions, key_valid, start, end, k.device)
        return self.k.narrow(2, 0, end), self.v.narrow(2, 0, end), c._positions(end), c._valid(end)


class KVCache:
    """Preallocated decoding cache for one batch of ``batch_size`` rows and ``max_len`` tokens.

    ``length`` counts the slots filled so far (pad slots included); ``LM.forward`` calls
    ``advance(T)`` after each call. ``reset()`` empties it for reuse with the same batch size.
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be a positive number of tokens")
        self.n_layers, self.batch_size, self.max_len = n_layers, batch_size, max_len
        self.length = 0
        self._layers = [LayerCache(self) for _ in range(n_layers)]
        self._pos: torch.Tensor | None = None  # (B, L) per-row key positions
        self._shared_pos: torch.Tensor | None = None  # (L,) while every row shares positions
        self._row_positions = False  # True once any call gave (B, T) positions
        self._valid_buf: torch.Tensor | None = None  # (B, L), allocated at the first padded call
        self._recorded_until = 0  # slots whose positions/validity are stored (the first layer)
        # what every layer would otherwise recompute in one decoding step (RoPE tables, ...),
        # keyed by its maker; emptied when the step ends
        self.step_memo: dict = {}

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache sized for ``model`` (default ``max_len``: its context, ``block_size``);
        refused, in one line, for a model with a bidirectional mixer (left-to-right decoding
        would give it wrong text)."""
        from minlm.modules.block import check_decodable

        check_decodable(model.config)
        return cls(len(model.blocks), batch_size, max_len or model.config.block_size)

    def layer(self, i: int) -> LayerCache:
        return self._layers[i]

    def advance(self, T: int) -> None:
        self.length += T
        self.step_memo.clear()

    def reset(self) -> None:
        """Forget every token (buffers are kept and overwritten)."""
        self.length = self._recorded_until = 0
        self.step_memo.clear()
        self._row_positions = False
        if self._valid_buf is not None:
            self._valid_buf.fill_(True)
        for layer in self._layers:
            for part in (layer, *layer._slots.values()):
                part.state = None

    # --- positions and validity, shared by every layer ------------------------------------
    def _record(self, positions: torch.Tensor, key_valid: torch.Tensor | None, start: int,
                end: int, device) -> None:
        if self._recorded_until >= end:  # another layer already stored this call's slots
            return
        B, T = self.batch_size, end - start
        if self._pos is None:
            self._pos = torch.zeros(B, self.max_len, dtype=torch.long, device=device)
            self._shared_pos = torch.zeros(self.max_len, dtype=torch.long, device=device)
        if positions.dim() == 2:
            if not self._row_positions and start > 0:  # earlier slots had shared positions
                self._pos[:, :start] = self._shared_pos[:start]
            self._row_positions = True
            self._pos[:, start:end] = positions
        else:  # _pos is filled from _shared_pos when rows first get their own positions
            self._shared_pos.narrow(0, start, T).copy_(positions)
            if self._row_positions:
                self._pos[:, start:end] = positions
        if key_valid is not None:
            if self._valid_buf is None:
                self._valid_buf = torch.ones(B, self.max_len, dtype=torch.bool, device=device)
            self._valid_buf[:, start:end] = key_valid[:, -T:]
        elif self._valid_buf is not None:
            self._valid_buf[:, start:end] = True
        self._recorded_until = end

    def _positions(self, end: int) -> torch.Tensor:
        return self._pos[:, :end] if self._row_positions else self._shared_pos.narrow(0, 0, end)

    def _valid(self, end: int) -> torch.Tensor | None:
        return None if self._valid_buf is None else self._valid_buf[:, :end]
