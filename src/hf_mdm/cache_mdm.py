"""A transformers `Cache` over whole canvases: the keys and values of every position of every row, for decoding in
blocks.

A masked diffusion model denoises a fixed-length canvas, so its cache is not a growing prefix (transformers'
`DynamicCache`) but one slot per canvas position, written where a forward pass runs. `MDMCanvasCache` holds them for
a batch; `cache.segment(rows, start)` is the `Cache` one forward pass gets: it runs on positions [start, start + q)
of those rows, writes their fresh keys and values there, and attends over the rows' whole canvas. What lies outside
the segment is what the last pass over it wrote:
    - exact when those positions did not change since (a block-causal model, whose finished blocks never change);
    - an approximation otherwise: Fast-dLLM's prefix and dual caches on a bidirectional model, where positions
      outside the active block do not see what it decoded since they were written.
A shifted model (Dream) also needs the last hidden state just before the segment: the cache keeps those too.

This file travels with every saved checkpoint as remote code: it imports only torch/transformers.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class CanvasLayer(CacheLayerMixin):
    """One layer's keys and values, (batch, kv_heads, canvas_length, head_dim), viewed by one forward pass: rows
    `rows` (None: all) from position `start`. The tensors belong to `owner`, the layer of the whole cache."""

    is_sliding = False

    def __init__(self, batch_size: int, canvas_length: int, rows=None, start: int = 0, owner=None):
        super().__init__()
        self.batch_size, self.canvas_length = batch_size, canvas_length
        self.rows, self.start = rows, start
        self.owner = owner if owner is not None else self

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        owner = self.owner
        shape = (self.batch_size, key_states.shape[1], self.canvas_length)
        owner.keys = key_states.new_zeros(shape + (key_states.shape[-1],))
        owner.values = value_states.new_zeros(shape + (value_states.shape[-1],))
        owner.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Writes the segment's (rows, kv_heads, q, head_dim) keys and values; returns the rows' whole canvas."""
        owner = self.owner
        if not owner.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.start + key_states.shape[2]
        if self.rows is None:  # every row: written in place, returned without a copy
            owner.keys[:, :, self.start : end] = key_states
            owner.values[:, :, self.start : end] = value_states
            return owner.keys, owner.values
        owner.keys[self.rows, :, self.start : end] = key_states
        owner.values[self.rows, :, self.start : end] = value_states
        return owner.keys[self.rows], owner.values[self.rows]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.canvas_length, 0

    def get_seq_length(self) -> int:
        return self.start

    def get_max_length(self) -> int:
        return self.canvas_length


class MDMCanvasCache(Cache):
    """Keys and values of every layer over whole canvases, for `batch_size` rows (see the module docstring).

    Args:
        num_layers (`int`): the model's `num_hidden_layers`.
        batch_size (`int`), canvas_length (`int`): the canvas `generate()` decodes.
    """

    def __init__(self, num_layers: int, batch_size: int, canvas_length: int, _layers=None, _hidden=None,
                 _rows=None, _start: int = 0):
        layers = _layers or [CanvasLayer(batch_size, canvas_length) for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.num_rows, self.canvas_length = batch_size, canvas_length
        self.rows, self.start = _rows, _start
        self.hidden = _hidden if _hidden is not None else {}  # {"states": (batch, canvas_length, hidden)}

    def segment(self, rows: torch.LongTensor | None, start: int) -> "MDMCanvasCache":
        """The cache one forward pass gets: it runs on rows `rows` (None: all) from canvas position `start`."""
        layers = [CanvasLayer(self.num_rows, self.canvas_length, rows, start, layer.owner) for layer in self.layers]
        return MDMCanvasCache(len(layers), self.num_rows, self.canvas_length, layers, self.hidden, rows, start)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.start

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def record_hidden(self, hidden_states: torch.Tensor) -> None:
        """Keeps the segment's last hidden states (rows, q, hidden)."""
        states = self.hidden.get("states")
        if states is None or states.shape[-1] != hidden_states.shape[-1]:
            states = hidden_states.new_zeros((self.num_rows, self.canvas_length, hidden_states.shape[-1]))
            self.hidden["states"] = states
        end = self.start + hidden_states.shape[1]
        if self.rows is None:
            states[:, self.start : end] = hidden_states.detach()
        else:
            states[self.rows, self.start : end] = hidden_states.detach()

    def hidden_before_segment(self) -> torch.Tensor | None:
        """(rows, 1, hidden): the last hidden state recorded at position start - 1 (a shifted head reads it)."""
        states = self.hidden.get("states")
        if states is None or self.start == 0:
            return None
        before = states[:, self.start - 1 : self.start]
        return before if self.rows is None else before[self.rows]


__all__ = ["MDMCanvasCache"]
