"""What the Hugging Face adapters assume about the model they hook, checked at ``apply()`` and on the first call.

The adapters read and rewrite the keyword arguments of the language model and its decoder layers, and follow the
KV cache across ``generate`` steps. Those names moved between transformers releases (5.24 renamed the language
model's ``past_key_values`` argument and output field to ``cache``; the old name stays a deprecated alias until
5.40), so nothing here hard-codes one: the cache argument is read from ``inspect.signature`` of the language
model's forward, the cache object is used through the public ``Cache.get_seq_length``, and anything that does not
match what the adapters were tested against raises :class:`TransformersContractError` naming the installed
version and what differs, instead of pruning into a silently wrong answer.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch

#: transformers releases the tokenprune tests cover: >= TESTED_FLOOR and < TESTED_CEILING (pyproject's ``vlm`` extra)
TESTED_FLOOR = (5, 17)
TESTED_CEILING = (5, 41)
#: names the language model's KV-cache argument has had (newest first)
CACHE_ARGUMENTS = ("cache", "past_key_values")
#: set to 1 to try a transformers release outside the tested range (the structural checks below still run)
ALLOW_UNTESTED_ENV = "VISATTN_TOKENPRUNE_ALLOW_UNTESTED"
#: attention implementations whose decoder-layer masks the adapters build (``layout.attention_mask_4d``)
LAYER_MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


class TransformersContractError(ValueError):
    """The hooked model does not look like what the adapters were tested against (names the version)."""


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return str(transformers.__version__)


def _release(version: str) -> tuple[int, int]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece else ""
        parts.append(int(digits) if digits else 0)
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def _fail(what: str) -> TransformersContractError:
    floor, ceiling = ".".join(map(str, TESTED_FLOOR)), ".".join(map(str, TESTED_CEILING))
    version = transformers_version()
    return TransformersContractError(f"tokenprune: transformers {version} (tested: >={floor},<{ceiling}): {what}")


def check_version() -> None:
    """Refuse a transformers release outside the tested range unless ``VISATTN_TOKENPRUNE_ALLOW_UNTESTED=1``."""
    version = transformers_version()
    if version == "not installed" or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return
    if not TESTED_FLOOR <= _release(version) < TESTED_CEILING:
        raise _fail(f"this release is outside the tested range; set {ALLOW_UNTESTED_ENV}=1 to try it anyway")


def _parameters(module: torch.nn.Module) -> dict:
    try:
        return dict(inspect.signature(module.forward).parameters)  # follows functools.wraps to the real forward
    except (TypeError, ValueError) as err:
        raise _fail(f"cannot read the signature of {type(module).__name__}.forward ({err})") from err


@dataclass(frozen=True)
class LanguageModelContract:
    """How to talk to one hooked language model: the name of its KV-cache argument (and output field)."""

    cache_arg: str
    model_class: str

    def cache_in(self, kwargs: dict):
        """The cache the caller passed, under the current name or a deprecated alias still accepted."""
        cache = kwargs.get(self.cache_arg)
        if cache is None:
            for name in CACHE_ARGUMENTS:
                if name != self.cache_arg and kwargs.get(name) is not None:
                    return kwargs[name]
        return cache

    def check_call(self, args: tuple, kwargs: dict) -> None:
        """A prefill call: keyword arguments only, a 2-D (or no) padding mask, no cache under another name."""
        if args:
            raise _fail(f"{self.model_class} was called with {len(args)} positional argument(s); the adapters "
                        "read keyword arguments only")
        if kwargs.get("inputs_embeds") is None:
            raise _fail(f"{self.model_class} received no inputs_embeds in a prefill with images")
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise _fail(f"{self.model_class} received an attention_mask of type {type(mask).__name__}"
                        f"{'' if not isinstance(mask, torch.Tensor) else f' with shape {tuple(mask.shape)}'}; "
                        "the adapters need a 2-D padding mask (or none)")
        self.check_no_stray_cache(kwargs)

    def check_no_stray_cache(self, kwargs: dict) -> None:
        for name, value in kwargs.items():
            if name not in CACHE_ARGUMENTS and _is_cache(value):
                raise _fail(f"{self.model_class} received its KV cache as {name!r}, not {self.cache_arg!r}")

    def cache_out(self, output):
        """The cache a forward returned (output field named like the argument); refuses an unknown layout."""
        fields = getattr(output, "__dataclass_fields__", None)
        if fields is None:
            raise _fail(f"{self.model_class} returned a {type(output).__name__}, not a ModelOutput dataclass")
        for name in (self.cache_arg, *CACHE_ARGUMENTS):
            if name in fields:
                return getattr(output, name)
        stray = [name for name in fields if _is_cache(getattr(output, name, None))]
        raise _fail(f"{type(output).__name__} has no {self.cache_arg!r} field"
                    + (f" (the cache is in {stray})" if stray else ""))


#: generate()'s ``cache_implementation`` names of the pre-allocated (fixed-length) cache classes
_STATIC_CACHE_NAMES = {"StaticCache": "static", "OffloadedStaticCache": "offloaded_static", "HybridCache": "hybrid",
                       "SlidingWindowCache": "sliding_window", "HybridChunkedCache": "hybrid_chunked"}


def check_cache_kind(cache) -> None:
    """A pruned prefill needs a cache that grows with what it is fed (``DynamicCache``, generate()'s default).

    A pre-allocated cache (``generate(cache_implementation="static")`` and its kin, ``Cache.is_compileable``) is
    sized and masked for the unpruned prompt; it is refused here, before any other check, naming the setting."""
    if cache is None or not getattr(cache, "is_compileable", False):
        return
    kind = type(cache).__name__
    name = _STATIC_CACHE_NAMES.get(kind)
    setting = f"cache_implementation={name!r}" if name else "a pre-allocated KV cache"
    raise ValueError(f"tokenprune: {setting} ({kind}) is not supported with a pruner attached: pruning shortens "
                     f"the prefill, which needs the default dynamic cache; call generate() without "
                     f"cache_implementation (or with cache_implementation='dynamic')")


def _is_cache(value: object) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is required to build a hooked model
        return False
    return isinstance(value, Cache)


def language_model_contract(lm: torch.nn.Module) -> LanguageModelContract:
    """Check the language model's forward arguments at ``apply()``; return how to read its cache."""
    params = _parameters(lm)
    name = type(lm).__name__
    cache_arg = next((arg for arg in CACHE_ARGUMENTS if arg in params), None)
    if cache_arg is None:
        raise _fail(f"{name}.forward takes none of {CACHE_ARGUMENTS} (its arguments: {sorted(params)})")
    missing = [arg for arg in ("inputs_embeds", "attention_mask", "position_ids") if arg not in params]
    if missing:
        raise _fail(f"{name}.forward has no argument(s) {missing}")
    return LanguageModelContract(cache_arg, name)


def check_decoder_layers(lm: torch.nn.Module, layers) -> None:
    """LLM-stage methods rewrite every decoder layer's mask and rotary embeddings and recompute q/k rows."""
    name = type(lm).__name__
    if not callable(getattr(lm, "rotary_emb", None)):
        raise _fail(f"{name} has no rotary_emb module (needed to re-rotate kept tokens)")
    for layer in layers[:1]:
        params = _parameters(layer)
        lname = type(layer).__name__
        missing = [a for a in ("attention_mask", "position_embeddings") if a not in params]
        if missing:
            raise _fail(f"{lname}.forward has no argument(s) {missing}")
        first = next(iter(params), None)
        if first != "hidden_states":
            raise _fail(f"{lname}.forward's first argument is {first!r}, not 'hidden_states'")
        attn = getattr(layer, "self_attn", None)
        needs = ("q_proj", "k_proj", "head_dim")
        if attn is None or any(not hasattr(attn, n) for n in needs) or not hasattr(layer, "input_layernorm"):
            raise _fail(f"{lname} lacks input_layernorm / self_attn.{{q_proj,k_proj,head_dim}} (Llama-style layer)")


def check_layer_call(layer: torch.nn.Module, impl: str, kwargs: dict) -> None:
    """First prefill call of a hooked decoder layer: the mask and rotary formats the adapters substitute."""
    lname = type(layer).__name__
    if impl not in LAYER_MASK_IMPLEMENTATIONS:
        raise _fail(f"attn_implementation={impl!r}: LLM-stage pruning builds decoder masks for "
                    f"{LAYER_MASK_IMPLEMENTATIONS} only")
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() in (2, 4)):
        raise _fail(f"{lname} received an attention_mask of type {type(mask).__name__}; the adapters substitute "
                    "4-D tensors (2-D for flash attention)")
    rope = kwargs.get("position_embeddings")
    if not (isinstance(rope, tuple) and len(rope) == 2 and all(isinstance(t, torch.Tensor) and t.dim() == 3
                                                                  for t in rope)):
        raise _fail(f"{lname} received position_embeddings that are not a (cos, sin) pair of (B, L, D) tensors")


def check_cache_after_prefill(contract: LanguageModelContract, cache, length: int) -> None:
    """The cache a pruned prefill returns must report the sequence the language model saw, per the public API."""
    if cache is None:
        return
    get = getattr(cache, "get_seq_length", None)
    if not callable(get):
        raise _fail(f"the {type(cache).__name__} returned by {contract.model_class} has no get_seq_length()")
    try:
        seen = get(0)
    except TypeError as err:
        raise _fail(f"{type(cache).__name__}.get_seq_length(0) failed ({err})") from err
    if not isinstance(seen, int) or seen != length:
        raise _fail(f"{type(cache).__name__}.get_seq_length(0) = {seen!r} after a prefill of {length} tokens")
