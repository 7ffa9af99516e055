"""Greedy decode over a static, per-layer KV cache, one CUDA graph per step (``bench-prune --decode-mode graph``).

Eager ``generate()`` with a dynamic cache spends most of a 7B decode step on the host (Python, a ``torch.cat`` per
layer per step, mask building), so its timings follow the host's phases. :class:`StaticDecoder` takes the host out:

1. the prefill runs once through ``generate(max_new_tokens=1)``, with the pruner attached, i.e. exactly the path
   ``generate()`` takes (pruning happens as it always does);
2. each decoder layer's cache length is read from the cache that prefill returned: every layer the same for the
   vision / embedding-stage methods, shorter from the drop layer on for the LLM-stage ones (FastV, PyramidDrop,
   DART, ZipVL); :func:`visattn.tokenprune.decode_layers` says what each layer's decode steps attend over and
   where they are placed (what the adapter's decode hooks substitute);
3. :class:`StaticKV` holds, per layer, buffers of exactly that layer's prefill length + N new tokens, and the
   prefill's keys and values are copied in, so a pruned configuration reads less KV per step, as it would in a
   server;
4. the N - 1 decode steps run a step function of our own over fixed buffers: the next token ids (B, 1), a step
   counter, per-layer bool masks (a column opened per step) and position bases, all device tensors updated in place;
   the step embeds the token, calls every decoder layer with its own mask, positions and rotary embeddings, applies
   the final norm and the LM head, suppresses the end-of-sequence ids (``min_new_tokens`` = N) and writes the argmax
   into the input buffer. Nothing in it reads the device from the host, so on CUDA it is captured once with
   ``torch.cuda.CUDAGraph`` (two eager warm-up steps on a side stream first) and replayed N - 1 times; elsewhere
   the same step runs eagerly.

The decoder layers are called directly, so the pruner's own decode hooks (which read cache lengths on the host)
stay out of the step; their substitutions come from ``decode_layers`` instead. LLaVA-1.5 / LLaVA-NeXT (Llama-style
RoPE over 2-D position ids) with SDPA or eager attention only: Qwen2-VL's M-RoPE (3-D positions, rope deltas) is not
supported here and stays on ``generate()``.
"""

from __future__ import annotations

import inspect
import time

import torch

#: attention implementations whose decode mask this module builds (a 4-D bool / additive mask over the static cache)
IMPLEMENTATIONS = ("sdpa", "eager")


class StaticKV:
    """Per-layer static key / value buffers (B, H, length_l, D), each its own length; written in place.

    The decoder layers call ``update(keys, values, layer_idx, ...)`` (the transformers ``Cache`` method they use,
    under either of its signatures); the new entries go to column ``write[layer_idx]`` (a one-element device
    tensor the step sets) and the whole buffers are returned, so the attention sees every slot and the mask decides
    which are real."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        if len(keys) != len(values) or not keys:
            raise ValueError(f"keys / values: {len(keys)} and {len(values)} layers; need the same, at least one")
        self.keys, self.values = keys, values
        self.write: list[torch.Tensor | None] = [None] * len(keys)

    @property
    def lengths(self) -> list[int]:
        """Slots per layer."""
        return [k.shape[2] for k in self.keys]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this step's keys and values at the layer's write column; return the layer's full buffers."""
        index = self.write[layer_idx]
        self.keys[layer_idx].index_copy_(2, index, key_states.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, index, value_states.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]


def generate_next_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1) position of the first generated token as ``generate()`` places it: the prompt's position ids are the
    running count of real tokens minus one (0 on padding), each new token one past the prompt's last column."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    return pos[:, -1:] + 1


def _language_model(model: torch.nn.Module) -> torch.nn.Module:
    core = getattr(model, "model", None)
    if core is None or not hasattr(core, "language_model") or not hasattr(model, "lm_head"):
        raise NotImplementedError(f"model={type(model).__name__}: graph decode needs a ...ForConditionalGeneration "
                                  "with model.language_model and lm_head")
    if not type(model).__name__.startswith("Llava"):
        raise NotImplementedError(f"model={type(model).__name__}: graph decode supports LLaVA / LLaVA-NeXT only "
                                  "(Qwen2-VL's M-RoPE positions and rope deltas: use decode mode 'generate')")
    lm = core.language_model
    impl = lm.config._attn_implementation
    if impl not in IMPLEMENTATIONS:
        raise NotImplementedError(f"attn_implementation={impl!r}: graph decode builds masks for {IMPLEMENTATIONS}")
    return lm


def _returned_cache(output):
    for name in ("cache", "past_key_values"):  # transformers 5.24 renamed the field
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    raise RuntimeError(f"generate() returned no KV cache ({type(output).__name__})")


def _layer_kv(cache, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is None or idx >= len(layers):
        raise RuntimeError(f"{type(cache).__name__} has no per-layer keys / values for layer {idx} (cache.layers)")
    return layers[idx].keys, layers[idx].values


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class StaticDecoder:
    """Prefill ``inputs`` once, then greedy-decode ``new_tokens`` tokens per sample over a :class:`StaticKV`
    (module docstring). :meth:`capture` records the step as a CUDA graph; :meth:`run` decodes (replays, or runs the
    step eagerly) and returns the milliseconds of each of the N - 1 steps; :attr:`tokens` (B, N) holds the N
    greedy tokens afterwards (the prefill's first, then one per step), :attr:`cache_lengths` the slots per layer."""

    def __init__(self, model: torch.nn.Module, inputs: dict, new_tokens: int):
        from visattn import tokenprune as tp

        if not isinstance(new_tokens, int) or new_tokens < 2:
            raise ValueError(f"new_tokens={new_tokens!r}: need an int >= 2 (decode = the steps after the first)")
        if "input_ids" not in inputs:
            raise ValueError("inputs: need input_ids")
        lm = _language_model(model)
        self.model, self.lm, self.layers = model, lm, list(lm.layers)
        self.new_tokens = new_tokens
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                                 return_dict_in_generate=True)
        self.first = out.sequences[:, -1:].clone()
        cache = _returned_cache(out)
        plan = tp.decode_layers(model) or [(None, None)] * len(self.layers)
        if len(plan) != len(self.layers):
            raise RuntimeError(f"decode_layers gave {len(plan)} entries for {len(self.layers)} decoder layers")
        own_valid, own_pos = mask.bool(), generate_next_positions(mask)
        self.cuda = ids.is_cuda
        self.mask_form = torch.bool if lm.config._attn_implementation != "eager" else None
        self._masks: dict[int, tuple] = {}  # id(valid) -> (mask buffer, its initial state, prefill length)
        self._bases: dict[int, torch.Tensor] = {}  # id(next_pos) -> (B, 1) position of the first new token
        self._layer_mask, self._layer_base = [], []
        keys, values, self.prefill_lengths = [], [], []
        for idx, (valid, next_pos) in enumerate(plan):
            valid = own_valid if valid is None else valid
            next_pos = own_pos if next_pos is None else next_pos
            k, v = _layer_kv(cache, idx)
            length = k.shape[2]
            if valid.shape != (k.shape[0], length):
                raise RuntimeError(f"layer {idx}: its cache holds {tuple(k.shape[:1])} x {length} tokens but its "
                                   f"decode mask covers {tuple(valid.shape)}")
            size = (k.shape[0], k.shape[1], length + new_tokens, k.shape[3])
            keys.append(torch.cat([k, k.new_zeros(size[0], size[1], new_tokens, size[3])], 2))
            values.append(torch.cat([v, v.new_zeros(size[0], size[1], new_tokens, size[3])], 2))
            self.prefill_lengths.append(length)
            if id(valid) not in self._masks:
                init = torch.cat([valid, valid.new_zeros(valid.shape[0], new_tokens)], 1)[:, None, None, :]
                self._masks[id(valid)] = (init.clone(), init, length)
            if id(next_pos) not in self._bases:
                self._bases[id(next_pos)] = next_pos.to(torch.long)
            self._layer_mask.append(list(self._masks).index(id(valid)))
            self._layer_base.append(list(self._bases).index(id(next_pos)))
        del out, cache
        self.kv = StaticKV(keys, values)
        self._mask_list = list(self._masks.values())
        self._base_list = list(self._bases.values())
        device = ids.device
        self._lengths = [torch.tensor([n], device=device) for _, _, n in self._mask_list]
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.next_ids = self.first.clone()
        self.tokens = torch.zeros(ids.shape[0], new_tokens, dtype=torch.long, device=device)
        eos = _eos_ids(model)
        self._eos = torch.tensor(eos, device=device) if eos else None
        params = inspect.signature(self.layers[0].forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._extra = {k: v for k, v in (("use_cache", True),) if k in params}
        self._pass_positions = "position_ids" in params
        self.graph = None
        self.reset()

    @property
    def cache_lengths(self) -> list[int]:
        """Static cache slots per decoder layer: that layer's prefill length + N."""
        return self.kv.lengths

    def reset(self) -> None:
        """Back to the state right after the prefill (the KV slots past the prefill need no reset: each is
        written before its mask column opens)."""
        self.step_index.zero_()
        self.next_ids.copy_(self.first)
        self.tokens[:, :1] = self.first
        for buf, init, _ in self._mask_list:
            buf.copy_(init)

    def _step(self) -> None:
        """One decode step on the fixed buffers (no host read of the device)."""
        hidden = self.lm.embed_tokens(self.next_ids)
        writes = [n + self.step_index for n in self._lengths]
        for (buf, _, _), write in zip(self._mask_list, writes, strict=True):
            buf.index_fill_(3, write, True)
        positions = [base + self.step_index for base in self._base_list]
        ropes = [self.lm.rotary_emb(hidden, pos) for pos in positions]
        masks = [buf if self.mask_form is torch.bool else
                 torch.zeros(buf.shape, dtype=hidden.dtype, device=buf.device).masked_fill(
                     ~buf, torch.finfo(hidden.dtype).min) for buf, _, _ in self._mask_list]
        for idx, layer in enumerate(self.layers):
            m, p = self._layer_mask[idx], self._layer_base[idx]
            self.kv.write[idx] = writes[m]
            kwargs = {self._cache_arg: self.kv, **self._extra}
            if self._pass_positions:
                kwargs["position_ids"] = positions[p]
            out = layer(hidden, attention_mask=masks[m], position_embeddings=ropes[p], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        logits = self.model.lm_head(self.lm.norm(hidden[:, -1])).float()
        if self._eos is not None:  # min_new_tokens = N: generate() never picks an end-of-sequence id
            logits.index_fill_(1, self._eos, float("-inf"))
        nxt = logits.argmax(-1, keepdim=True)
        self.next_ids.copy_(nxt)
        self.tokens.index_copy_(1, self.step_index + 1, nxt)
        self.step_index += 1

    def capture(self) -> None:
        """Record one step as a CUDA graph (two eager warm-up steps on a side stream first, as PyTorch requires),
        then reset. Raises whatever capture raises (the caller records it and keeps the eager step)."""
        if not self.cuda:
            raise RuntimeError("capture: CUDA graphs need the model on a CUDA device")
        self.reset()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), torch.cuda.graph(graph):
                self._step()
        finally:
            self.reset()
        self.graph = graph

    def run(self) -> list[float]:
        """Decode N - 1 steps from the prefill's state; milliseconds of each step (CUDA events around every
        replay / eager step on CUDA, with no synchronisation between steps; ``perf_counter`` elsewhere)."""
        self.reset()
        step = self.graph.replay if self.graph is not None else self._step
        steps = self.new_tokens - 1
        with torch.no_grad():
            if self.cuda:
                events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
                events[0].record()
                for i in range(steps):
                    step()
                    events[i + 1].record()
                events[-1].synchronize()
                return [a.elapsed_time(b) for a, b in zip(events, events[1:], strict=False)]
            marks = [time.perf_counter()]
            for _ in range(steps):
                step()
                marks.append(time.perf_counter())
        return [(b - a) * 1e3 for a, b in zip(marks, marks[1:], strict=False)]

    def close(self) -> None:
        """Drop the graph and the buffers (their memory returns to the allocator)."""
        self.graph = None
        self.kv = None
        self._mask_list = self._masks = None
