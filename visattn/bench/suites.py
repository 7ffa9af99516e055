"""Benchmark suites: YAML files of attention problems, loaded into typed dataclasses and validated.

A suite is a YAML mapping::

    suite: vision                      # its name (defaults to the file name)
    description: NAT-T / DiNAT-T / Swin-T / BiFormer-T stages at 224²
    defaults: {dtype: float16, batch: 256}    # applied to every problem that does not set the field
    problems:
      - name: nat-t-s1                 # unique in the suite
        op: na                         # na | window | routing
        spatial: [56, 56]              # the token map, 1-3 dims
        kernel: [7, 7]                 # neighborhood kernel (na) or window size (window)
        heads: 2
        head_dim: 32
        sweep: {rpb: [false, true], backward: [false, true]}   # one problem per combination

``sweep`` expands one entry into the product of the listed values; each expanded name gets a suffix per swept field
(``-rpb`` / ``-backward`` for true booleans, nothing for false ones or all-zero lists, ``-shift3x3`` for lists,
``-head_dim64`` for other values).
Every error names the file, the problem and the field. The suites shipped with visattn live in ``visattn/configs``
(``--suite vision`` finds ``vision.yaml`` there); any other path works too.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

OPS = ("na", "window", "routing")
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16"}
PEERS = ("sdpa_cudnn", "sdpa_flash", "flex", "natten_flex", "timm_roll_sdpa", "biformer_gather")
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
BACKWARD_FLOP_FACTOR = 3.5  # forward + backward counted as 1 + 2.5 forwards, as FA2-style kernels cost


class SuiteError(ValueError):
    """A suite file that cannot be used; the message names the file, the problem and the field."""


@dataclass(frozen=True)
class Problem:
    """One attention problem of a suite (heads-last tensors ``[batch, *spatial, heads, head_dim]``).

    Args:
        name: unique name in the suite (used by ``--only`` and in result files).
        op: "na" (neighborhood, NATTEN semantics), "window" (Swin windows, optionally shifted) or "routing"
            (BiFormer bi-level routing).
        spatial: the token map, 1 to 3 dims (routing: 2).
        kernel: neighborhood kernel (na) or window size (window), one int per spatial dim; unused for routing.
        heads, head_dim, batch: sizes.
        dilation, stride: per dim (na); default 1.
        shift: per dim (window); default 0.
        regions, topk: regions per side and routed regions per query region (routing).
        rpb: with a relative-position-bias table ``[heads, 2k-1, ...]`` (na / window).
        backward: time forward + backward instead of forward only.
        dtype: float32 / float16 / bfloat16 (fp32 / fp16 / bf16 accepted).
        scale: softmax scale (default ``head_dim ** -0.5``).
        peers: which peers to time (default: every one that applies).
        target: the goal this row is judged by, as text.
        note: where the shape comes from.
    """

    name: str
    spatial: tuple[int, ...]
    heads: int
    head_dim: int
    op: str = "na"
    kernel: tuple[int, ...] = ()
    batch: int = 1
    dilation: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    shift: tuple[int, ...] = ()
    regions: tuple[int, ...] = ()
    topk: int = 0
    rpb: bool = False
    backward: bool = False
    dtype: str = "bfloat16"
    scale: float | None = None
    peers: tuple[str, ...] | None = None
    target: str = ""
    note: str = ""

    @property
    def window(self) -> bool:
        return self.op == "window"

    @property
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    @property
    def keys_per_query(self) -> int:
        """Keys each query attends: prod(kernel) (na, window), topk × tokens per region (routing)."""
        if self.op == "routing":
            return self.topk * math.prod(s // r for s, r in zip(self.spatial, self.regions, strict=True))
        return math.prod(self.kernel)

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5 if self.scale is None else self.scale


@dataclass
class Suite:
    name: str
    problems: list[Problem]
    description: str = ""
    source: str = ""


# ----------------------------------------------------------------------------------------------- counting
def useful_flops(p: Problem) -> float:
    """QKᵀ and PV only, as NATTEN counts: 4 · B · heads · N · keys-per-query · head_dim (×3.5 with backward)."""
    flops = 4.0 * p.batch * p.heads * p.tokens * p.keys_per_query * p.head_dim
    return flops * BACKWARD_FLOP_FACTOR if p.backward else flops


def fewest_bytes(p: Problem) -> float:
    """The least traffic: read q, k, v and write o once; backward also reads q, k, v, o, dO and the float32 LSE
    and writes dq, dk, dv (the LSE is written by the forward and read back)."""
    per_tensor = p.batch * p.tokens * p.heads * p.head_dim * ELEMENT_BYTES[p.dtype]
    forward = 4 * per_tensor
    if not p.backward:
        return forward
    lse = p.batch * p.tokens * p.heads * 4
    return forward + 8 * per_tensor + 2 * lse


# ----------------------------------------------------------------------------------------------- loading
_FIELDS = {f.name: f for f in dataclasses.fields(Problem)}
_TUPLE_FIELDS = ("spatial", "kernel", "dilation", "stride", "shift", "regions")


def _fail(where: str, message: str):
    raise SuiteError(f"{where}: {message}")


def _int_list(value, where: str, name: str, length: int | None, minimum: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool) and length is not None:
        value = [value] * length  # a single int stands for every dim, as the functional API accepts
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        _fail(where, f"field '{name}' must be a list of integers, got {value!r}")
    if length is not None and len(value) != length:
        _fail(where, f"field '{name}' must have {length} entries (one per spatial dim), got {list(value)}")
    if any(v < minimum for v in value):
        _fail(where, f"field '{name}' entries must be >= {minimum}, got {list(value)}")
    return tuple(value)


def _problem(raw: dict, where: str) -> Problem:
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        _fail(where, f"unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}")
    for required in ("name", "spatial", "heads", "head_dim"):
        if required not in raw:
            _fail(where, f"missing field '{required}'")
    name = raw["name"]
    if not isinstance(name, str) or not name:
        _fail(where, f"field 'name' must be a non-empty string, got {name!r}")
    where = f"{where} ({name})"
    op = raw.get("op", "na")
    if op not in OPS:
        _fail(where, f"field 'op' must be one of {OPS}, got {op!r}")
    spatial = _int_list(raw["spatial"], where, "spatial", None, 1)
    if not 1 <= len(spatial) <= 3:
        _fail(where, f"field 'spatial' must have 1 to 3 dims, got {list(spatial)}")
    rank = len(spatial)
    values: dict = {"name": name, "op": op, "spatial": spatial}
    for key in ("heads", "head_dim", "batch", "topk"):
        if key in raw:
            v = raw[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(where, f"field '{key}' must be a positive integer, got {v!r}")
            values[key] = v
    for key in ("kernel", "dilation", "stride", "regions"):
        if key in raw:
            values[key] = _int_list(raw[key], where, key, rank, 1)
    if "shift" in raw:
        values["shift"] = _int_list(raw["shift"], where, "shift", rank, 0)
    for key in ("rpb", "backward"):
        if key in raw:
            if not isinstance(raw[key], bool):
                _fail(where, f"field '{key}' must be true or false, got {raw[key]!r}")
            values[key] = raw[key]
    if "dtype" in raw:
        if raw["dtype"] not in DTYPE_NAMES:
            _fail(where, f"field 'dtype' must be one of {sorted(set(DTYPE_NAMES))}, got {raw['dtype']!r}")
        values["dtype"] = DTYPE_NAMES[raw["dtype"]]
    if raw.get("scale") is not None:
        if not isinstance(raw["scale"], (int, float)) or isinstance(raw["scale"], bool) or not raw["scale"] > 0:
            _fail(where, f"field 'scale' must be a positive number, got {raw['scale']!r}")
        values["scale"] = float(raw["scale"])
    if raw.get("peers") is not None:
        peers = raw["peers"]
        if not isinstance(peers, list) or any(p not in PEERS for p in peers):
            _fail(where, f"field 'peers' must be a list drawn from {PEERS}, got {peers!r}")
        values["peers"] = tuple(peers)
    for key in ("target", "note"):
        if key in raw:
            values[key] = str(raw[key])
    problem = Problem(**values)
    _check_geometry(problem, where)
    return problem


def _check_geometry(p: Problem, where: str) -> None:
    """The same limits the functional API enforces, checked here so a bad suite fails before any GPU work."""
    if p.op in ("na", "window") and len(p.kernel) != p.rank:
        _fail(where, f"field 'kernel' is required for op '{p.op}' ({p.rank} integers)")
    if p.op == "na":
        dilation = p.dilation or (1,) * p.rank
        stride = p.stride or (1,) * p.rank
        for i, (length, k, d, s) in enumerate(zip(p.spatial, p.kernel, dilation, stride, strict=True)):
            if k * d > length:
                _fail(where, f"field 'kernel' × 'dilation' = {k}×{d} exceeds spatial[{i}] = {length}")
            if s > k:
                _fail(where, f"field 'stride' {s} exceeds kernel {k} in dim {i}")
        if p.rpb and any(s > 1 for s in stride):
            _fail(where, "field 'rpb' cannot be combined with 'stride' > 1 (see docs/SEMANTICS.md)")
    elif p.op == "window":
        shift = p.shift or (0,) * p.rank
        for i, (length, w, t) in enumerate(zip(p.spatial, p.kernel, shift, strict=True)):
            if length % w:
                _fail(where, f"field 'kernel' (window) {w} does not divide spatial[{i}] = {length}")
            if t >= w:
                _fail(where, f"field 'shift' {t} must be smaller than the window {w} in dim {i}")
    else:
        if p.rank != 2 or len(p.regions) != 2:
            _fail(where, "op 'routing' needs 2-D 'spatial' and 'regions' ([regions_h, regions_w])")
        if any(s % r for s, r in zip(p.spatial, p.regions, strict=True)):
            _fail(where, f"field 'regions' {list(p.regions)} must divide 'spatial' {list(p.spatial)}")
        if not 1 <= p.topk <= math.prod(p.regions):
            _fail(where, f"field 'topk' must be in 1..{math.prod(p.regions)}, got {p.topk}")
        if p.rpb:
            _fail(where, "field 'rpb' does not apply to op 'routing'")


def _suffix(field_name: str, value) -> str:
    if isinstance(value, bool):
        return f"-{field_name}" if value else ""
    if isinstance(value, list):  # e.g. shift [3, 3] -> "-shift3x3"; an all-zero list (the default) adds nothing
        return f"-{field_name}{'x'.join(map(str, value))}" if any(value) else ""
    return f"-{field_name}{value}"


def _expand(raw: dict, where: str) -> list[dict]:
    sweep = raw.get("sweep")
    if sweep is None:
        return [raw]
    if not isinstance(sweep, dict) or not sweep:
        _fail(where, f"field 'sweep' must map field names to lists of values, got {sweep!r}")
    for key, values in sweep.items():
        if key not in _FIELDS or key == "name":
            _fail(where, f"field 'sweep' names '{key}', which is not a problem field")
        if not isinstance(values, list) or not values:
            _fail(where, f"field 'sweep.{key}' must be a non-empty list, got {values!r}")
    base = {k: v for k, v in raw.items() if k != "sweep"}
    out = []
    for combo in itertools.product(*sweep.values()):
        item = dict(base)
        suffix = ""
        for key, value in zip(sweep, combo, strict=True):
            item[key] = value
            suffix += _suffix(key, value)
        item["name"] = f"{base.get('name', '?')}{suffix}"
        out.append(item)
    return out


def parse_suite(data, source: str = "<suite>") -> Suite:
    """A Suite from already-parsed YAML (a mapping with ``problems``); raises SuiteError naming the bad field."""
    if not isinstance(data, dict):
        _fail(source, f"a suite must be a mapping with a 'problems' list, got {type(data).__name__}")
    unknown = sorted(set(data) - {"suite", "description", "defaults", "problems"})
    if unknown:
        _fail(source, f"unknown top-level key(s) {unknown}; allowed: suite, description, defaults, problems")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        _fail(source, f"'defaults' must be a mapping, got {defaults!r}")
    bad = sorted(set(defaults) - set(_FIELDS) - {"sweep"})
    if bad:
        _fail(f"{source}: defaults", f"unknown field(s) {bad}; allowed: {sorted(_FIELDS)}")
    entries = data.get("problems")
    if not isinstance(entries, list) or not entries:
        _fail(source, "'problems' must be a non-empty list")
    problems: list[Problem] = []
    for index, entry in enumerate(entries):
        where = f"{source}: problems[{index}]"
        if not isinstance(entry, dict):
            _fail(where, f"each problem must be a mapping, got {entry!r}")
        for raw in _expand({**defaults, **entry}, where):
            problems.append(_problem(raw, where))
    names = [p.name for p in problems]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        _fail(source, f"problem names must be unique, repeated: {duplicates}")
    name = data.get("suite") or Path(source).stem
    return Suite(name=str(name), problems=problems, description=str(data.get("description", "")), source=source)


def builtin_dir():
    """The folder of the suites shipped with visattn (package data, found the same way installed or not)."""
    return resources.files("visattn") / "configs"


def builtin_suites() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in builtin_dir().iterdir() if p.name.endswith(".yaml"))


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name (``vision``) or any YAML file by path."""
    import yaml

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SuiteError(f"--suite {name_or_path!r}: no such file")
        text, source = path.read_text(), str(path)
    else:
        candidate = builtin_dir() / f"{name_or_path}.yaml"
        if not candidate.is_file():
            raise SuiteError(f"--suite {name_or_path!r}: neither a file nor a built-in suite "
                             f"(built-in: {', '.join(builtin_suites())})")
        text, source = candidate.read_text(), f"visattn/configs/{name_or_path}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SuiteError(f"{source}: not valid YAML ({err})") from err
    return parse_suite(data, source)


__all__ = ["BACKWARD_FLOP_FACTOR", "OPS", "PEERS", "Problem", "Suite", "SuiteError", "builtin_suites", "fewest_bytes",
           "load_suite", "parse_suite", "useful_flops"]
