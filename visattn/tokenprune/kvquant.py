"""Mixed-precision KV-cache quantisation (ZipVL v1 / ZipCache arithmetic), plain torch: no transformers import.

ZipVL v1 (He et al., arXiv 2410.08584v1) keeps the KV cache of the important tokens at a high bit-width and
quantises the others' to a low one; the same authors' ZipCache release (NeurIPS 2024) fixes the arithmetic this
module follows:

* **asymmetric min-max** per group: ``scale = (max - min) / (2^bits - 1)``, ``code = round((x - min) / scale)``
  (an integer in ``0 … 2^bits - 1``), read back as ``code · scale + min``; a constant group (``scale = 0``)
  reads back exactly;
* **keys per channel**: one group per channel (heads flattened: ``H · D`` channels), over the token set's tokens
  (``group_size`` tokens per group when given);
* **values per token, channel-separable**: every channel is first divided by ``sqrt(max_t |v_tc|)`` over the
  sample's tokens (both precision sets), then one group per token over its ``H · D`` channels (``group_size``
  channels per group when given); the channel factor multiplies back on read.

The statistics of one sample never see another sample or a padding column (a batch row equals the row run
alone). Codes are packed ``8 // bits`` to a byte (``uint8``); ``bits = 16`` stores the tensor as it is.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

#: bit-widths a token set may be stored with (16: unquantised)
BITS = (2, 4, 8, 16)


def check_bits(value: object, name: str = "bits") -> tuple[int, int]:
    """``(high, low)`` bit-widths, each in :data:`BITS`, ``high >= low`` (ValueError/TypeError naming ``name``)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name}={value!r}: expected a pair (high, low) of bit-widths from {BITS}")
    if any(isinstance(b, bool) or not isinstance(b, numbers.Integral) or int(b) not in BITS for b in value):
        raise ValueError(f"{name}={value!r}: each bit-width must be one of {BITS}")
    high, low = int(value[0]), int(value[1])
    if high < low:
        raise ValueError(f"{name}={value!r}: the important tokens' bit-width (first) must be >= the others' (second)")
    return high, low


def check_group_size(value: object, name: str = "group_size") -> int | None:
    """``None`` (one group per channel / token over the whole set) or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name}={value!r}: expected None or an int >= 1 (elements per quantisation group)")
    return int(value)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    grouped = codes.reshape(*codes.shape[:-1], -1, per) << shifts
    return grouped.sum(-1, dtype=torch.uint8) if per > 1 else grouped[..., 0]


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


@dataclass
class Stored:
    """One tensor stored at ``bits`` in groups along its last axis: packed codes with a scale and a zero (the
    group's minimum) per group, or, at 16 bits, the tensor itself in ``raw``."""

    bits: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    raw: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes this storage holds (codes, scales and zeros; the raw tensor at 16 bits)."""
        parts = (self.raw,) if self.raw is not None else (self.codes, self.scale, self.zero)
        return sum(t.numel() * t.element_size() for t in parts)

    def decode(self) -> torch.Tensor:
        """The stored tensor read back (dequantised) in its original dtype and shape."""
        if self.raw is not None:
            return self.raw
        n = self.shape[-1]
        groups = -(-n // self.group)
        codes = _unpack(self.codes, self.bits, groups * self.group).reshape(*self.shape[:-1], groups, self.group)
        work = torch.promote_types(self.scale.dtype, torch.float32)
        x = codes.to(work) * self.scale[..., None].to(work) + self.zero[..., None].to(work)
        return x.reshape(*self.shape[:-1], groups * self.group)[..., :n].to(self.dtype)


def encode(x: torch.Tensor, bits: int, group_size: int | None = None) -> Stored:
    """Store ``x`` at ``bits``: asymmetric min-max groups of ``group_size`` consecutive elements of the last axis
    (the whole axis when None; a short last group is padded with its last element, which moves no min / max).
    Half-precision inputs are coded in float32; scales and zeros are kept in ``x``'s dtype."""
    if bits == 16 or not x.numel():
        return Stored(bits, tuple(x.shape), x.dtype, raw=x)
    n = x.shape[-1]
    group = n if group_size is None else min(group_size, n)
    pad = (-n) % group
    xs = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], -1) if pad else x
    xs = xs.reshape(*x.shape[:-1], -1, group)
    if xs.element_size() < 4:
        xs = xs.float()
    lo, hi = xs.amin(-1), xs.amax(-1)
    scale = (hi - lo) / float(2**bits - 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((xs - lo[..., None]) / safe[..., None]).clamp_(0, 2**bits - 1).to(torch.uint8)
    packed = _pack(codes.reshape(*x.shape[:-1], -1), bits)
    return Stored(bits, tuple(x.shape), x.dtype, codes=packed, scale=scale.to(x.dtype), zero=lo.to(x.dtype),
                  group=group)


def encode_keys(k: torch.Tensor, bits: int, group_size: int | None = None) -> Stored:
    """Keys of one token set, ``k`` (T, C): per channel (groups along the tokens). Read back as (C, T)."""
    return encode(k.transpose(0, 1), bits, group_size)


def value_channel_scale(v: torch.Tensor) -> torch.Tensor:
    """The channel-separable factor ``sqrt(max_t |v_tc|)`` of values ``v`` (T, C) (1 for an all-zero channel)."""
    c = v.abs().amax(0).sqrt()
    return torch.where(c > 0, c, torch.ones_like(c))


def encode_values(v: torch.Tensor, bits: int, channel: torch.Tensor, group_size: int | None = None) -> Stored:
    """Values of one token set, ``v`` (T, C), divided by ``channel`` (C,): per token (groups along channels)."""
    return encode(v if bits == 16 else v / channel, bits, group_size)


@dataclass
class _SampleKV:
    index: list[torch.Tensor]  # per precision set: the sample's cache columns
    keys: list[Stored]
    values: list[Stored]
    channel: torch.Tensor | None  # (C,) value channel factor (None when no set is quantised)


def precision_sets(important: torch.Tensor, valid: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per sample, the cache columns of the two precision sets: ``[important & valid, ~important & valid]``
    (indices on the masks' device; one readback)."""
    sets = torch.stack([important & valid, ~important & valid]).cpu()
    return [[torch.nonzero(sets[s, b]).flatten().to(valid.device) for s in range(2)] for b in range(valid.shape[0])]


class MixedPrecisionKV:
    """The prefill part of one layer's KV cache, each sample's tokens in two precision sets (important: ``bits[0]``,
    the rest: ``bits[1]``), padding columns not stored. :meth:`decode` rebuilds (B, H, L, D) keys and values
    (padding columns zero: the attention mask hides them)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, columns: list[list[torch.Tensor]],
                 bits: tuple[int, int], group_size: int | None = None):
        """``keys`` / ``values`` (B, H, L, D); ``columns``: per sample, the columns of the important and of the
        other set (:func:`precision_sets`)."""
        bsz, heads, length, dim = keys.shape
        self.shape = (bsz, heads, length, dim)
        self.value_dim = values.shape[-1]
        self.dtype, self.device = keys.dtype, keys.device
        self.bits = bits
        self.samples: list[_SampleKV] = []
        for b in range(bsz):
            kb = keys[b].permute(1, 0, 2).reshape(length, heads * dim)  # (L, C): heads flattened into channels
            vb = values[b].permute(1, 0, 2).reshape(length, heads * self.value_dim)
            cols = [c.to(keys.device) for c in columns[b]]
            quantised = any(bt < 16 and c.numel() for bt, c in zip(bits, cols, strict=True))
            channel = value_channel_scale(vb[torch.cat(cols)]) if quantised else None
            ks, vs = [], []
            for bt, c in zip(bits, cols, strict=True):
                ks.append(encode_keys(kb[c], bt, group_size))
                vs.append(encode_values(vb[c], bt, channel, group_size))
            self.samples.append(_SampleKV(cols, ks, vs, channel))

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (B, H, L, D), read back from the stored sets."""
        bsz, heads, length, dim = self.shape
        k = torch.zeros(bsz, length, heads * dim, dtype=self.dtype, device=self.device)
        v = torch.zeros(bsz, length, heads * self.value_dim, dtype=self.dtype, device=self.device)
        for b, s in enumerate(self.samples):
            for cols, ks, vs in zip(s.index, s.keys, s.values, strict=True):
                if not cols.numel():
                    continue
                k[b, cols] = ks.decode().transpose(0, 1)
                vals = vs.decode()
                v[b, cols] = vals if vs.bits == 16 else vals * s.channel
        return (k.reshape(bsz, length, heads, dim).transpose(1, 2),
                v.reshape(bsz, length, heads, self.value_dim).transpose(1, 2))

    def nbytes(self) -> list[int]:
        """Bytes stored per sample (codes, scales, zeros, the value channel factors, the column indices as int32)."""
        out = []
        for s in self.samples:
            n = sum(x.nbytes for x in (*s.keys, *s.values))
            n += 0 if s.channel is None else s.channel.numel() * s.channel.element_size()
            n += 4 * sum(c.numel() for c in s.index)
            out.append(n)
        return out

    def fp16_bytes(self) -> list[int]:
        """Bytes the same tokens' keys and values take in a float16 cache, per sample."""
        _, heads, _, dim = self.shape
        return [2 * heads * (dim + self.value_dim) * sum(c.numel() for c in s.index) for s in self.samples]
