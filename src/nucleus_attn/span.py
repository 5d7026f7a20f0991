"""Which positions of a padded KV cache hold real keys.

A batch of sequences of different lengths shares one padded cache of N positions.
`KeySpan` records, per sequence, the half-open range ``[starts[b], ends[b])`` of positions
that exist: right padding (``sparse_decode(lengths=...)``) moves ``ends``; left padding
(Hugging Face batched generation) moves ``starts``. Every method and op reads validity,
the attention sink (first ``sink`` real tokens) and the recent window (last ``window``
real tokens) from here, so ragged batches never attend to padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class KeySpan:
    """Valid key range per sequence of a padded cache.

    Parameters
    ----------
    starts : Tensor
        ``[B]`` int64, first valid position of each sequence.
    ends : Tensor
        ``[B]`` int64, one past the last valid position (``1 <= ends - starts``).
    n : int
        Padded cache length N (``ends <= n``).

    A span is immutable: derived values (``lengths``) are computed once, so build a new
    span rather than writing into ``starts``/``ends`` (also between CUDA-graph replays).
    """

    starts: Tensor
    ends: Tensor
    n: int

    @staticmethod
    def full(batch: int, n: int, device: torch.device | str = "cpu") -> KeySpan:
        """Every position of every sequence is valid."""
        zeros = torch.zeros(batch, dtype=torch.int64, device=device)
        return KeySpan(zeros, torch.full_like(zeros, n), n)

    @staticmethod
    def from_lengths(lengths: Tensor, n: int) -> KeySpan:
        """Right-padded batch: keys at positions ``>= lengths[b]`` do not exist."""
        ends = lengths.to(torch.int64)
        return KeySpan(torch.zeros_like(ends), ends, n)

    @cached_property
    def lengths(self) -> Tensor:
        """``[B]`` number of valid keys per sequence (computed once per span: the model
        integration shares one span between all layers of a decode step)."""
        return self.ends - self.starts

    def positions(self) -> Tensor:
        """``[1, N]`` int64 positions, broadcastable against ``starts[:, None]``."""
        return torch.arange(self.n, device=self.starts.device)[None, :]

    def valid_mask(self) -> Tensor:
        """``[B, N]`` bool, True where a key exists."""
        pos = self.positions()
        return (pos >= self.starts[:, None]) & (pos < self.ends[:, None])

    def forced(self, idx: Tensor, sink: int, window: int) -> Tensor:
        """True where position ``idx`` (``[B, ...]``) is in the sink or the recent window.

        The sink is the first ``sink`` valid positions, the window the last ``window``.
        """
        shape = (-1,) + (1,) * (idx.dim() - 1)
        s, e = self.starts.view(shape), self.ends.view(shape)
        valid = (idx >= s) & (idx < e)
        return valid & ((idx < s + sink) | (idx >= e - window))

    def with_length(self, n: int) -> KeySpan:
        """The span after appending tokens to every sequence up to N = ``n`` (left padding).

        Right-padded spans cannot grow this way (the appended tokens would leave holes);
        callers that append (the model integration) always use left padding.
        """
        return KeySpan(self.starts, torch.full_like(self.ends, n), n)
