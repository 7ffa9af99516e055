"""A transformers cache layer holding a prefill's keys / values in mixed precision (ZipVL ``kv="quantize"``).

After a prefill the LLM-stage adapter swaps every ``DynamicLayer`` of the returned ``DynamicCache`` for a
:class:`MixedPrecisionLayer`: the prefill's columns are stored by :class:`~visattn.tokenprune.kvquant.
MixedPrecisionKV` (integer codes with a scale and a zero per group), the tokens that decode steps append stay in
the cache's dtype (as ZipCache's streaming buffer before its periodic re-compression), and every ``update``
returns the prefill read back (dequantised) followed by those tokens. The layer keeps ``DynamicLayer``'s interface
of transformers 5.17–5.40 (``update(key, value, *args, **kwargs)``, ``get_seq_length``, ``get_mask_sizes``;
``keys`` / ``values`` are the appended tokens only); beam reordering and cropping into the prefill are refused.
"""

from __future__ import annotations

import functools

import torch

from visattn.tokenprune.hf_contract import _fail
from visattn.tokenprune.kvquant import MixedPrecisionKV, precision_sets


@functools.cache
def mixed_precision_layer() -> type:
    """The cache layer class (built on first use: transformers is an optional dependency, imported here)."""
    from transformers.cache_utils import DynamicLayer

    class MixedPrecisionLayer(DynamicLayer):
        """One decoder layer's cache: a :class:`MixedPrecisionKV` prefill plus the decode tokens appended since."""

        def __init__(self, prefill: MixedPrecisionKV, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.prefill = prefill
            self.prefill_len = prefill.shape[2]
            self.dtype, self.device = keys.dtype, keys.device
            bsz, heads = keys.shape[:2]  # fresh empty tensors: a view would keep the float prefill alive
            self.keys = keys.new_empty(bsz, heads, 0, keys.shape[-1])
            self.values = values.new_empty(bsz, heads, 0, values.shape[-1])
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            """Append the new tokens (kept in the cache's dtype) and return every cached key / value, the prefill's
            dequantised."""
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            k, v = self.prefill.decode()
            return torch.cat([k, self.keys], dim=-2), torch.cat([v, self.values], dim=-2)

        def get_seq_length(self) -> int:
            """Prefill tokens plus the tokens appended since."""
            return self.prefill_len + self.keys.shape[-2]

        def crop(self, tokens_to_remove: int) -> None:
            """Remove appended tokens (a negative count, as ``DynamicLayer``); never the quantised prefill."""
            if tokens_to_remove < 0 and -tokens_to_remove > self.keys.shape[-2]:
                raise NotImplementedError("ZipVL kv='quantize': cannot crop into the quantised prefill of the KV cache")
            super().crop(tokens_to_remove)

        def _refuse(self, *args, **kwargs) -> None:
            raise NotImplementedError("ZipVL kv='quantize': the mixed-precision KV cache cannot be reordered or "
                                      "repeated across the batch (beam search, assisted decoding); use greedy or "
                                      "sampling")

        batch_repeat_interleave = batch_select_indices = reorder_cache = _refuse

    return MixedPrecisionLayer


def __getattr__(name: str):
    if name == "MixedPrecisionLayer":  # ``from visattn.tokenprune.hf_kvcache import MixedPrecisionLayer``
        return mixed_precision_layer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install_mixed_precision(cache, important: torch.Tensor, valid: torch.Tensor, bits: tuple[int, int],
                            group_size: int | None) -> tuple[list[int], list[int]]:
    """Replace every layer of ``cache`` (a filled ``DynamicCache``) by a :class:`MixedPrecisionLayer` storing the
    ``important`` (B, L) columns at ``bits[0]`` and the other ``valid`` ones at ``bits[1]``; returns the bytes
    stored and the bytes of the same tokens in float16, per sample, summed over layers."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not all(type(x) is DynamicLayer for x in layers):
        kinds = sorted({type(x).__name__ for x in layers}) if isinstance(layers, list) else type(cache).__name__
        raise _fail(f"ZipVL kv='quantize' replaces the DynamicLayer layers of a DynamicCache; this cache holds "
                    f"{kinds}")
    stored = [0] * valid.shape[0]
    fp16 = [0] * valid.shape[0]
    columns = precision_sets(important, valid)
    for i, layer in enumerate(layers):
        kv = MixedPrecisionKV(layer.keys, layer.values, columns, bits, group_size)
        layers[i] = mixed_precision_layer()(kv, layer.keys, layer.values)
        stored = [a + b for a, b in zip(stored, kv.nbytes(), strict=True)]
        fp16 = [a + b for a, b in zip(fp16, kv.fp16_bytes(), strict=True)]
    return stored, fp16
