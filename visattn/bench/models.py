"""``visattn bench``: images/sec of whole timm models, with timm ``benchmark.py``'s flags, keys and OOM handling.

Any model ``timm.create_model`` can build runs here, visattn's own families included (``visattn.models`` registers
them). ``NAME@visattn`` runs a timm Swin, MaxViT or HaloNet with its attention on visattn's ops
(``visattn.models.patch_timm``), so stock and accelerated run side by side; ``--visattn-swin`` adds that twin after
every Swin named. ``--compare-compile`` adds a ``torch.compile``'d inference row after each model.

What matches timm's ``benchmark.py``: flag names and meanings, the result keys (``infer_samples_per_sec``,
``infer_step_time`` [ms], ``infer_batch_size``, ``infer_img_size``, ``infer_gmacs``, ``train_...``,
``param_count`` [millions]), batch-size decay on out-of-memory (``timm.utils.decay_batch_step``: 256, 192, 128,
96, ...), wildcards and ``--model-list``. What differs, on purpose: step times are medians (CUDA events after
warm-up on a GPU, ``perf_counter`` on the CPU) and ``samples_per_sec`` is ``batch / median step``; only an
out-of-memory error decays the batch (another error is reported as it is, never hidden behind a smaller batch);
results are JSON unless the file ends in ``.csv`` or ``--results-format csv``; every file also records the device,
torch / triton / timm versions, peak memory, and each model's ratio to the first model of the run.

Under ``torchrun --nproc_per_node N -m visattn.cli bench ...`` every process benchmarks inference on its own GPU
(all at once) and a DistributedDataParallel train step; rank 0 also measures one process alone first (unless
``--scaling-baseline`` gives that number) and reports per-rank and aggregate img/s and the scaling efficiency.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fnmatch
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from visattn import backends, functional
from visattn.bench.common import environment, write_csv, write_json

VISATTN_SUFFIX = "@visattn"
PRECISIONS = ("float32", "float16", "bfloat16", "amp", "amp_bfloat16")  # timm's names, kept in result files
# the documented spelling (visattn's dtype names, as every other command) -> timm's
_PRECISION_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "amp": "amp", "amp_bf16": "amp_bfloat16"}
_AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
PHASES = {"both": ["infer", "train"], "inference": ["infer"], "train": ["train"]}
ATTENTION_BACKENDS = ("auto", "reference", "triton")
#: what ``visattn bench --help`` shows above the flags
DESCRIPTION = """\
Images per second of timm models (visattn's families included), inference and a train step, with timm
benchmark.py's flags. NAME@visattn runs a timm Swin on visattn's window attention; every row names the attention
backend that actually ran ("timm" where no visattn op did: a Swin on the CPU runs timm's own, faster path unless
--backend forces visattn's). "x row1" columns are img/s relative to the first row of the run.

examples:
  visattn bench -m nat_mini dinat_mini --bench inference
  visattn bench -m swin_tiny_patch4_window7_224 --visattn-swin --precision bf16
  visattn bench -m 'agent_*' --device cpu --backend reference -b 2"""


# ----------------------------------------------------------------------------------------------- arguments
class ParseModelKwargs(argparse.Action):
    """``--model-kwargs k=v ...`` -> dict; values are Python literals where they parse, else strings (as timm)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string}: expected key=value, got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def _choice(names: dict, flag: str):
    """argparse ``type``: the documented names (``names``' keys) or timm's (its values) -> timm's name."""
    def parse(text: str) -> str:
        if text in names:
            return names[text]
        if text in names.values():
            return text
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: choose one of {', '.join(names)}")

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """timm benchmark.py's flags (same names, same meanings) plus visattn's few additions."""
    timm_group = parser.add_argument_group("timm benchmark.py flags")
    add = timm_group.add_argument
    add("--model", "-m", dest="model", nargs="+", action="extend", metavar="NAME",
        help="timm model name(s) or wildcards (e.g. 'nat_*'); NAME@visattn runs a timm Swin on visattn's window "
             "attention (default: resnet50, as timm)")
    add("--model-list", default="", metavar="FILE", help="text file with one model name per line")
    add("--bench", default="both", choices=["inference", "train", "both"], help="what to time (default: both)")
    add("--no-retry", action="store_true", help="do not decay the batch size and retry on out-of-memory")
    add("--results-file", default="", help="write results here (JSON, or CSV when it ends in .csv)")
    add("--results-format", default=None, choices=["json", "csv"], help="default: from --results-file's suffix")
    add("--num-warm-iter", type=int, default=None,
        help="warm-up iterations after the first (untimed) step (default: 10 on CUDA, 0 on CPU)")
    add("--num-bench-iter", type=int, default=None, help="timed iterations (default: 40 on CUDA, 3 on CPU)")
    add("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    add("-b", "--batch-size", type=int, default=None, help="batch size (default: 256 on CUDA, 2 on CPU); "
        "decays on out-of-memory as timm's")
    add("--img-size", type=int, default=None, help="input image side (default: the model's)")
    add("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
        help="full input size, e.g. 3 224 224")
    add("--use-train-size", action="store_true", help="run inference at train size, not test_input_size")
    add("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    add("--gp", default=None, metavar="POOL", help="global pool type (default: the model's)")
    add("--channels-last", action="store_true", help="channels_last memory layout for model and input")
    add("--grad-checkpointing", action="store_true", help="gradient checkpointing through blocks (train)")
    add("--amp", action="store_true", help="autocast mixed precision (overrides --precision)")
    add("--amp-dtype", default="float16", type=_choice(_AMP_DTYPES, "--amp-dtype"), metavar="{fp16,bf16}",
        help="autocast dtype with --amp (default: fp16; timm's float16 / bfloat16 are accepted too)")
    add("--precision", default="float32", type=_choice(_PRECISION_NAMES, "--precision"),
        metavar="{fp32,fp16,bf16,amp,amp_bf16}",
        help="numeric precision; amp / amp_bf16 are fp16 / bf16 autocast (default: fp32; timm's float32, float16, "
             "bfloat16, amp_bfloat16 are accepted too)")
    add("--fast-norm", action="store_true", help="timm's experimental fast norm layers")
    add("--reparam", action="store_true", help="reparameterize the model (timm.utils.reparameterize_model)")
    add("--model-kwargs", nargs="*", default={}, action=ParseModelKwargs, metavar="K=V",
        help="extra timm.create_model keyword arguments")
    add("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
        help="torch.compile the model with this backend (default when given: inductor)")
    add("--torchcompile-mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune, ...)")
    add("--opt", default="sgd", help="optimizer of the train step (timm.optim names; default: sgd)")
    add("--lr", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    add("--opt-eps", type=float, default=None, help="optimizer epsilon (default: the optimizer's)")
    add("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas (default: the optimizer's)")
    add("--momentum", type=float, default=0.9, help="optimizer momentum (default: 0.9)")
    add("--weight-decay", type=float, default=0.0001, help="weight decay (default: 0.0001)")
    add("--clip-grad", type=float, default=None, help="clip gradients at this norm / value (default: no clipping)")
    add("--clip-mode", default="norm", choices=["norm", "value", "agc"], help="gradient clipping mode")
    add("--smoothing", type=float, default=0.1, help="label smoothing of the train loss (default: 0.1)")
    add("--drop", type=float, default=None, help="dropout rate (default: the model's)")
    add("--drop-path", type=float, default=None, help="drop-path rate (default: the model's)")
    add("--drop-block", type=float, default=None, help="drop-block rate (default: the model's)")
    ours = parser.add_argument_group("visattn additions")
    ours.add_argument("--visattn-swin", action="store_true",
                      help="after every timm Swin model also run NAME@visattn (same weights, visattn windows)")
    ours.add_argument("--compare-compile", action="store_true",
                      help="after every model also time its inference under torch.compile (backend: --torchcompile "
                           "or inductor) as a row 'NAME (compiled)'")
    ours.add_argument("--time-budget", type=float, default=None, metavar="S",
                      help="skip the models not started within S seconds (they are listed as skipped)")
    ours.add_argument("--scaling-baseline", type=float, nargs=2, default=None, metavar=("INFER", "TRAIN"),
                      help="under torchrun: one-process img/s to compute scaling against, instead of measuring it")
    ours.add_argument("--backend", default=None, choices=ATTENTION_BACKENDS,
                      help="force visattn's attention backend for the whole run (default: the configured one, "
                           "'auto' unless VISATTN_BACKEND says otherwise); 'reference' runs visattn's exact "
                           "PyTorch ops, also for NAME@visattn on the CPU")
    ours.add_argument("--plot", default=None, metavar="DIR", help="write an img/s-per-model PNG into DIR")
    ours.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")


# ----------------------------------------------------------------------------------------------- model list
@dataclass(frozen=True)
class ModelSpec:
    """One row of the run: a timm name, whether its Swin / MaxViT / HaloNet attention runs on visattn, whether it
    is compiled."""

    name: str
    visattn_swin: bool = False
    compiled: bool = False

    @property
    def label(self) -> str:
        text = self.name + (VISATTN_SUFFIX if self.visattn_swin else "")
        return text + (" (compiled)" if self.compiled else "")


def parse_spec(text: str) -> ModelSpec:
    """``"swin_tiny_patch4_window7_224@visattn"`` -> ModelSpec(name, visattn_swin=True)."""
    name, sep, suffix = text.strip().partition("@")
    if sep and suffix != VISATTN_SUFFIX[1:]:
        raise ValueError(f"--model {text!r}: the only suffix is {VISATTN_SUFFIX!r}")
    return ModelSpec(name, visattn_swin=bool(sep))


def resolve_models(args: argparse.Namespace) -> list[ModelSpec]:
    """The run's models in order: --model-list lines, else --model names; wildcards expand through timm."""
    import timm

    import visattn.models  # noqa: F401  (registers visattn's model families with timm)

    if args.model_list:
        with open(args.model_list) as fh:
            texts = [line.strip() for line in fh if line.strip() and not line.lstrip().startswith("#")]
    else:
        texts = args.model or ["resnet50"]
    specs: list[ModelSpec] = []
    for text in texts:
        spec = parse_spec(text)
        if timm.is_model(spec.name):
            names = [spec.name]
        else:
            names = timm.list_models(spec.name) if any(c in spec.name for c in "*?[") else []
            if not names:
                raise ValueError(f"--model {text!r}: timm knows no such model (and it matches no model as a "
                                 "wildcard); visattn's are registered by `visattn.models`")
        for name in names:
            found = replace(spec, name=name)
            specs.append(found)
            if args.visattn_swin and not found.visattn_swin and fnmatch.fnmatch(name, "swin*"):
                specs.append(replace(found, visattn_swin=True))
    if args.compare_compile:  # every eager row first, so a --time-budget cut costs compiled rows before eager ones
        specs = specs + [replace(spec, compiled=True) for spec in specs]
    return specs


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything that shapes one model's measurement (built once from the command line)."""

    device: str
    batch_size: int
    num_warm_iter: int
    num_bench_iter: int
    amp_dtype: torch.dtype | None
    model_dtype: torch.dtype
    precision: str
    channels_last: bool = False
    img_size: int | None = None
    input_size: tuple[int, int, int] | None = None
    use_train_size: bool = False
    create_kwargs: dict = field(default_factory=dict)
    reparam: bool = False
    grad_checkpointing: bool = False
    compile_backend: str | None = None
    compile_mode: str | None = None
    opt: str = "sgd"
    opt_kwargs: dict = field(default_factory=dict)
    clip_grad: float | None = None
    clip_mode: str = "norm"
    smoothing: float = 0.1
    no_retry: bool = False


def resolve_precision(precision: str) -> tuple[torch.dtype | None, torch.dtype]:
    """timm's precision names -> (autocast dtype or None, model and input dtype)."""
    return {
        "float32": (None, torch.float32), "float16": (None, torch.float16), "bfloat16": (None, torch.bfloat16),
        "amp": (torch.float16, torch.float32), "amp_bfloat16": (torch.bfloat16, torch.float32),
    }[precision]


def settings_from_args(args: argparse.Namespace, device: str) -> Settings:
    on_cuda = device.startswith("cuda")
    precision = args.precision
    if args.amp:  # as timm: --amp overrides --precision
        precision = "amp" if args.amp_dtype == "float16" else "amp_bfloat16"
    amp_dtype, model_dtype = resolve_precision(precision)
    for name in ("batch_size", "num_warm_iter", "num_bench_iter"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_warm_iter" else 1):
            raise ValueError(f"--{name.replace('_', '-')}={value} must be positive")
    create = {"num_classes": args.num_classes, "global_pool": args.gp, "drop_rate": args.drop,
              "drop_path_rate": args.drop_path, "drop_block_rate": args.drop_block}
    create = {k: v for k, v in create.items() if v is not None}
    create.update(args.model_kwargs or {})
    opt_kwargs = {"lr": args.lr, "weight_decay": args.weight_decay, "momentum": args.momentum}
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    return Settings(
        device=device,
        batch_size=args.batch_size or (256 if on_cuda else 2),
        num_warm_iter=args.num_warm_iter if args.num_warm_iter is not None else (10 if on_cuda else 0),
        num_bench_iter=args.num_bench_iter or (40 if on_cuda else 3),
        amp_dtype=amp_dtype, model_dtype=model_dtype, precision=precision, channels_last=args.channels_last,
        img_size=args.img_size, input_size=tuple(args.input_size) if args.input_size else None,
        use_train_size=args.use_train_size, create_kwargs=create, reparam=args.reparam,
        grad_checkpointing=args.grad_checkpointing, compile_backend=args.torchcompile,
        compile_mode=args.torchcompile_mode, opt=args.opt, opt_kwargs=opt_kwargs, clip_grad=args.clip_grad,
        clip_mode=args.clip_mode, smoothing=args.smoothing, no_retry=args.no_retry,
    )


# ----------------------------------------------------------------------------------------------- one model
def create_model(spec: ModelSpec, settings: Settings) -> tuple[nn.Module, tuple[int, int, int]]:
    """(model on the device in the run's dtype and layout, input size (C, H, W)), never pretrained."""
    import timm
    from timm.data import resolve_data_config

    import visattn.models  # noqa: F401  (registers visattn's model families with timm)

    kwargs = dict(settings.create_kwargs)
    size = settings.input_size[-1] if settings.input_size else settings.img_size
    try:  # models with a fixed patch grid (ViT, Swin) need the size at creation; others take any input
        model = timm.create_model(spec.name, pretrained=False, **kwargs, **({"img_size": size} if size else {}))
    except TypeError:
        model = timm.create_model(spec.name, pretrained=False, **kwargs)
    if spec.visattn_swin:
        from visattn.models import patch_timm

        patch_timm(model)  # raises ValueError naming the model when it has no timm Swin / MaxViT / HaloNet module
    if settings.reparam:
        from timm.utils import reparameterize_model

        model = reparameterize_model(model)
    model.to(device=settings.device, dtype=settings.model_dtype,
             memory_format=torch.channels_last if settings.channels_last else torch.preserve_format)
    data_args = {"img_size": settings.img_size, "input_size": settings.input_size}
    config = resolve_data_config({k: v for k, v in data_args.items() if v}, model=model,
                                 use_test_size=not settings.use_train_size)
    return model, tuple(config["input_size"])


def _maybe_compile(model: nn.Module, spec: ModelSpec, settings: Settings) -> nn.Module:
    if not (spec.compiled or settings.compile_backend):
        return model
    torch._dynamo.reset()  # as timm: a fresh cache per model, so one model's graphs never serve another
    return torch.compile(model, backend=settings.compile_backend or "inductor", mode=settings.compile_mode)


def _autocast(settings: Settings):
    if settings.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(settings.device).type, dtype=settings.amp_dtype)


class StepTimer:
    """Per-step times in ms: CUDA events on a GPU (no host sync inside the loop), perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device
        self.marks: list = []

    def time(self, step: Callable[[], object]) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            self.marks.append((start, end))
        else:
            started = time.perf_counter()
            step()
            self.marks.append((started, time.perf_counter()))

    def times_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [start.elapsed_time(end) for start, end in self.marks]
        return [(end - start) * 1e3 for start, end in self.marks]


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None  # the CPU allocator keeps no peak counter
    return torch.cuda.max_memory_allocated(device) / 2**20


def _iterations(count: int, progress, label: str):
    if progress is None:
        return range(count)
    return progress(range(count), desc=label, leave=False)


def _summary(times: list[float], batch: int, input_size: tuple, first_step_s: float, device: str) -> dict:
    step = statistics.median(times)
    return {"samples_per_sec": round(batch / step * 1e3, 2), "step_time": round(step, 3), "batch_size": batch,
            "img_size": input_size[-1], "peak_mem_mib": _peak_mib(device), "first_step_s": round(first_step_s, 3)}


def run_inference(model: nn.Module, spec: ModelSpec, settings: Settings, batch: int, input_size: tuple,
                  progress=None) -> dict:
    """timm's InferenceBenchmarkRunner step (forward under inference_mode and autocast), medians of the steps."""
    model.eval()
    runnable = _maybe_compile(model, spec, settings)
    x = torch.randn((batch, *input_size), device=settings.device, dtype=settings.model_dtype)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    timer = StepTimer(settings.device)
    _reset_peak(settings.device)
    with torch.inference_mode(), _autocast(settings):
        started = time.perf_counter()
        runnable(x)
        first_step_s = time.perf_counter() - started  # includes compilation for compiled rows
        for _ in _iterations(settings.num_warm_iter, progress, f"{spec.label} infer warm-up"):
            runnable(x)
        for _ in _iterations(settings.num_bench_iter, progress, f"{spec.label} infer"):
            timer.time(lambda: runnable(x))
        times = timer.times_ms()
    return _summary(times, batch, input_size, first_step_s, settings.device)


def make_optimizer(model: nn.Module, settings: Settings):
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=settings.opt, **settings.opt_kwargs)


def run_train(model: nn.Module, spec: ModelSpec, settings: Settings, batch: int, input_size: tuple,
              progress=None, wrap: Callable[[nn.Module], nn.Module] | None = None) -> dict:
    """timm's TrainBenchmarkRunner step: zero_grad, forward + loss under autocast, backward, optimizer step.

    ``wrap`` (e.g. DistributedDataParallel) wraps the model after grad checkpointing is set and before compile.
    """
    from timm.utils import dispatch_clip_grad

    model.train()
    if settings.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = make_optimizer(model, settings)
    runnable = _maybe_compile(wrap(model) if wrap else model, spec, settings)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.smoothing)
    x = torch.randn((batch, *input_size), device=settings.device, dtype=settings.model_dtype)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    num_classes = max(int(getattr(model, "num_classes", 0) or 0), 1)
    target = torch.randint(0, num_classes, (batch,), device=settings.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(settings):
            output = runnable(x)
            if isinstance(output, tuple):
                output = output[0]
            loss = loss_fn(output.float(), target)
        loss.backward()
        if settings.clip_grad is not None:
            dispatch_clip_grad(model.parameters(), settings.clip_grad, mode=settings.clip_mode)
        optimizer.step()

    timer = StepTimer(settings.device)
    _reset_peak(settings.device)
    started = time.perf_counter()
    step()
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize(settings.device)
    first_step_s = time.perf_counter() - started
    for _ in _iterations(settings.num_warm_iter, progress, f"{spec.label} train warm-up"):
        step()
    for _ in _iterations(settings.num_bench_iter, progress, f"{spec.label} train"):
        timer.time(step)
    return _summary(timer.times_ms(), batch, input_size, first_step_s, settings.device)


def is_out_of_memory(err: BaseException) -> bool:
    """True for the errors after which a smaller batch may fit (torch's OOM type, or its message on old paths)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def try_with_decay(run: Callable[[int], dict], batch_size: int, no_retry: bool = False,
                   on_retry: Callable[[int, str], None] | None = None) -> dict:
    """``run(batch)``, retried at timm's decayed batch sizes (``decay_batch_step``) while it runs out of memory.

    Returns run's result, or ``{"error": message, "tried_batch_sizes": [...]}`` when even batch 1 fails or the
    error was not an out-of-memory one (that one is never hidden behind a smaller batch).
    """
    from timm.utils import decay_batch_step

    tried = []
    while batch_size:
        tried.append(batch_size)
        try:
            return run(batch_size)
        except Exception as err:  # classify: only OOM is retried; the message goes into the result
            message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if not is_out_of_memory(err) or no_retry:
                return {"error": message, "tried_batch_sizes": tried}
        batch_size = decay_batch_step(batch_size)
        if on_retry and batch_size:
            on_retry(batch_size, message)
    return {"error": message, "tried_batch_sizes": tried}


def count_gmacs(spec: ModelSpec, settings: Settings, input_size: tuple) -> float | None:
    """GMACs of one image (batch 1) from ``torch.utils.flop_counter`` on the meta device (no memory, no time);
    attention counted through the exact reference path. None where the model cannot trace on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    from visattn import backends

    meta = replace(settings, device="meta", channels_last=False, reparam=False, model_dtype=torch.float32)
    try:
        with torch.device("meta"):
            model, _ = create_model(replace(spec, compiled=False), meta)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), backends.use_backend("reference"), counter:
            model.eval()(torch.empty((1, *input_size), device="meta"))
        return round(counter.get_total_flops() / 2 / 1e9, 2)
    except Exception:  # "where computable", as timm's profilers: a model that does not trace gets no number
        return None


def bench_model(spec: ModelSpec, settings: Settings, bench: str, progress=None, log=print) -> dict:
    """One result row in timm's key layout (``infer_*``, ``train_*``, ``param_count``) plus visattn's extras."""
    row: dict = {"model": spec.label}
    # the compiled twin (--compare-compile) times inference; the eager row above it has the train step
    phases = ["infer"] if spec.compiled else PHASES[bench]
    input_size = None
    for phase in phases:
        def run(batch: int, phase: str = phase) -> dict:
            nonlocal input_size
            model, input_size = create_model(spec, settings)
            row.setdefault("param_count", round(sum(p.numel() for p in model.parameters()) / 1e6, 2))
            if "backend" not in row and _compiled(spec, settings):  # a compiled graph records no backend
                row["backend"] = probe_backend(model, settings, input_size)
            runner = run_inference if phase == "infer" else run_train
            try:
                with functional.track_backends() as seen:
                    result = runner(model, spec, settings, batch, input_size, progress)
                if not _compiled(spec, settings):
                    row[f"{phase}_backend"] = describe_backends(seen)
                return result
            finally:
                del model

        result = try_with_decay(run, settings.batch_size, settings.no_retry,
                                on_retry=lambda b, why: log(f"{spec.label}: {why}; retrying at batch size {b}"))
        if "error" in result:
            row.update(error=f"{phase}: {result['error']}", tried_batch_sizes=result["tried_batch_sizes"])
            break
        row.update({f"{phase}_{k}": v for k, v in result.items()})
    if "error" not in row and input_size is not None and "infer" in phases:
        row["infer_gmacs"] = count_gmacs(spec, settings, input_size)
    _merge_backends(row, phases)
    return row


def describe_backends(counts) -> str:
    """The attention backends a run's visattn ops took, most calls first (``"triton"``, ``"reference"``,
    ``"triton+reference"``), or ``"timm"`` when no visattn op ran (timm's own attention)."""
    return "+".join(name for name, _ in counts.most_common()) if counts else "timm"


def probe_backend(model: nn.Module, settings: Settings, input_size: tuple) -> str:
    """The backends one eager batch-1 forward of ``model`` takes (for compiled rows, whose graphs record none)."""
    x = torch.randn((1, *input_size), device=settings.device, dtype=settings.model_dtype)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), _autocast(settings), functional.track_backends() as seen:
        model.eval()(x)
    return describe_backends(seen)


def _compiled(spec: ModelSpec, settings: Settings) -> bool:
    return bool(spec.compiled or settings.compile_backend)


def _merge_backends(row: dict, phases: list[str]) -> None:
    """One ``backend`` per row: the phases' (they agree unless a phase errored), or both when they differ."""
    seen = [row.pop(f"{phase}_backend") for phase in phases if f"{phase}_backend" in row]
    if seen and "backend" not in row:
        row["backend"] = seen[0] if len(set(seen)) == 1 else " / ".join(f"{p}: {b}" for p, b in zip(phases, seen,
                                                                                                    strict=False))


# ----------------------------------------------------------------------------------------------- distributed
def distributed_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun with more than one process, else None."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def bench_model_distributed(spec: ModelSpec, settings: Settings, bench: str, baseline: tuple | None,
                            log=print) -> dict:
    """Per-process inference (all ranks at once) and a DDP train step; rank 0 gets the combined row.

    No batch decay here: a rank that runs out of memory would leave the others waiting in a collective.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    on_cuda = settings.device.startswith("cuda")
    row: dict = {"model": spec.label, "world_size": world}
    phases = ["infer"] if spec.compiled else PHASES[bench]

    def measure(phase: str, distributed: bool) -> dict:
        model, input_size = create_model(spec, settings)
        row.setdefault("param_count", round(sum(p.numel() for p in model.parameters()) / 1e6, 2))
        if "backend" not in row:
            row["backend"] = probe_backend(model, settings, input_size)
        if phase == "infer":
            return run_inference(model, spec, settings, settings.batch_size, input_size)
        wrap = None
        if distributed:
            def wrap(m):
                return DistributedDataParallel(m, device_ids=[torch.device(settings.device).index] if on_cuda else None)
        return run_train(model, spec, settings, settings.batch_size, input_size, wrap=wrap)

    def guarded(fn) -> dict:
        try:
            return fn()
        except Exception as err:  # every rank reports, so all of them agree on skipping the model
            return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}

    one_process = [None]
    if baseline is None:
        if rank == 0:  # one process alone (the others wait): the 1-GPU number the scaling is measured against
            one_process[0] = {p: guarded(lambda p=p: measure(p, distributed=False)) for p in phases}
        dist.barrier()
        dist.broadcast_object_list(one_process, src=0)
    else:
        one_process[0] = {"infer": {"samples_per_sec": baseline[0]}, "train": {"samples_per_sec": baseline[1]}}
    for phase in phases:
        dist.barrier()  # start together, so the processes really share the machine
        mine = guarded(lambda phase=phase: measure(phase, distributed=True))
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        errors = [r["error"] for r in gathered if "error" in r]
        if errors:
            row["error"] = f"{phase}: {errors[0]}"
            break
        per_rank = [r["samples_per_sec"] for r in gathered]
        alone = (one_process[0] or {}).get(phase, {}).get("samples_per_sec")
        total = sum(per_rank)
        row.update({
            f"{phase}_samples_per_sec": round(total, 2),
            f"{phase}_samples_per_sec_per_rank": per_rank,
            f"{phase}_step_time": statistics.median(r["step_time"] for r in gathered),
            f"{phase}_batch_size": settings.batch_size,
            f"{phase}_global_batch_size": settings.batch_size * world,
            f"{phase}_img_size": gathered[0]["img_size"],
            f"{phase}_peak_mem_mib": max((r["peak_mem_mib"] or 0) for r in gathered) or None,
            f"{phase}_samples_per_sec_1proc": alone,
            f"{phase}_scaling_efficiency": round(total / (world * alone), 4) if alone else None,
        })
    return row


# ----------------------------------------------------------------------------------------------- the run
def add_ratios(rows: list[dict]) -> None:
    """``infer_ratio_to_first`` / ``train_ratio_to_first``: img/s over the first row that has that number."""
    for phase in ("infer", "train"):
        key = f"{phase}_samples_per_sec"
        first = next((r[key] for r in rows if r.get(key)), None)
        for r in rows:
            if first and r.get(key):
                r[f"{phase}_ratio_to_first"] = round(r[key] / first, 4)


def format_table(rows: list[dict]) -> str:
    def num(value, spec: str) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, spec)
        width = spec.split(".")[0].rstrip("dfs%")
        return "-".rjust(int(width) if width.isdigit() else 1)

    head = (f"{'model':44s} {'backend':>10s} {'batch':>5s} {'infer img/s':>12s} {'ms':>8s} {'x row1':>7s} "
            f"{'train img/s':>12s} {'ms':>8s} {'x row1':>7s} {'params M':>8s} {'GMACs':>6s} {'peak MiB':>9s}")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:44s} error: {r['error']}")
            continue
        peak = max((r.get(k) or 0) for k in ("infer_peak_mem_mib", "train_peak_mem_mib")) or None
        lines.append(
            f"{r['model']:44s} {r.get('backend', '-'):>10s} "
            f"{num(r.get('infer_batch_size', r.get('train_batch_size')), '5d')} "
            f"{num(r.get('infer_samples_per_sec'), '12.1f')} {num(r.get('infer_step_time'), '8.2f')} "
            f"{num(r.get('infer_ratio_to_first'), '7.2f')} {num(r.get('train_samples_per_sec'), '12.1f')} "
            f"{num(r.get('train_step_time'), '8.2f')} {num(r.get('train_ratio_to_first'), '7.2f')} "
            f"{num(r.get('param_count'), '8.2f')} {num(r.get('infer_gmacs'), '6.2f')} {num(peak, '9.0f')}")
        if r.get("world_size"):
            for phase in ("infer", "train"):
                if r.get(f"{phase}_samples_per_sec_per_rank"):
                    eff = r.get(f"{phase}_scaling_efficiency")
                    lines.append(f"{'':4s}{phase} per rank {r[f'{phase}_samples_per_sec_per_rank']} img/s, "
                                 f"1 process {num(r.get(f'{phase}_samples_per_sec_1proc'), '.1f')} img/s, "
                                 f"scaling efficiency {num(eff, '.1%')} over {r['world_size']} processes")
    for phase in ("infer", "train"):
        first = next((r for r in rows if r.get(f"{phase}_samples_per_sec")), None)
        if first is not None:
            lines.append(f"x row1 ({phase}): img/s relative to {first['model']} "
                         f"({first[f'{phase}_samples_per_sec']:.1f} img/s), the first row with a number")
    lines.append("backend: the attention backend visattn's ops ran on ('timm': no visattn op ran)")
    return "\n".join(lines)


def _progress_factory(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the `bench` extra; without it the run is just quiet
        return None
    return tqdm


def _resolve_device(requested: str | None, local_rank: int | None) -> str:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(requested).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: no CUDA device is visible (use --device cpu)")
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"--device {requested}: only cuda and cpu are supported")
    if kind == "cuda" and local_rank is not None:
        return f"cuda:{local_rank}"
    if kind == "cuda" and torch.device(requested).index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return requested


def run(args: argparse.Namespace) -> int:
    """Benchmark every requested model; print a table; write the results file and plot if asked. Exit 1 on any
    model error (the other models' numbers are still written)."""
    dist_info = distributed_env()
    try:
        device = _resolve_device(args.device, dist_info[2] if dist_info else None)
        settings = settings_from_args(args, device)
        specs = resolve_models(args)
    except (ValueError, OSError) as err:
        print(f"visattn bench: {err}", file=sys.stderr)
        return 2
    rank = 0
    if dist_info:
        import torch.distributed as dist

        rank = dist_info[0]
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as timm
    lead = rank == 0
    log = print if lead else (lambda *a, **k: None)
    progress = _progress_factory(lead and not args.no_progress)
    started = time.perf_counter()
    rows: list[dict] = []
    skipped: list[str] = []
    forced = contextlib.ExitStack()  # --backend: the attention default for the whole run, restored after
    if args.backend:
        forced.enter_context(backends.use_backend(args.backend, "attention"))
    try:
        iterator = progress(specs, desc="models") if progress else specs
        for spec in iterator:
            over_budget = [args.time_budget is not None and time.perf_counter() - started > args.time_budget]
            if dist_info:  # rank 0 decides, so every process skips the same models (no one waits in a collective)
                import torch.distributed as dist

                dist.broadcast_object_list(over_budget, src=0)
            if over_budget[0]:
                skipped.append(spec.label)
                continue
            if dist_info:
                row = bench_model_distributed(spec, settings, args.bench, args.scaling_baseline, log)
            else:
                row = bench_model(spec, settings, args.bench, progress, log)
            rows.append(row)
            if not progress:
                log(f"{row['model']}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "model"), flush=True)
    finally:
        forced.close()
        if dist_info:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not lead:
        return 0
    add_ratios(rows)
    print()
    print(format_table(rows))
    if skipped:
        print(f"skipped (time budget {args.time_budget:.0f} s): {', '.join(skipped)}")
    env = environment(device)
    header = {"bench": "models", **env, "wall_s": round(time.perf_counter() - started, 1),
              "settings": {"device": device, "batch_size": settings.batch_size, "precision": settings.precision,
                           "channels_last": settings.channels_last, "num_warm_iter": settings.num_warm_iter,
                           "num_bench_iter": settings.num_bench_iter, "torchcompile": settings.compile_backend,
                           "torchcompile_mode": settings.compile_mode, "bench": args.bench,
                           "world_size": dist_info[1] if dist_info else 1, "timing": "median of per-step times",
                           "attention_backend": args.backend or backends.get_backend("attention")},
              "skipped": skipped}
    if args.results_file:
        fmt = args.results_format or ("csv" if args.results_file.endswith(".csv") else "json")
        if fmt == "csv":
            path = write_csv(args.results_file, rows, extra={k: env[k] for k in ("date", "device", "torch", "triton",
                                                                                  "timm")})
        else:
            path = write_json(args.results_file, {**header, "rows": rows})
        print(f"wrote {path}")
    if args.plot:
        from visattn.bench import plots

        for path in plots.plot_models({**header, "rows": rows}, args.plot):
            print(f"wrote {path}")
    return 1 if any("error" in r for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visattn bench", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ModelSpec", "Settings", "add_arguments", "bench_model", "count_gmacs", "create_model", "main",
           "parse_spec", "resolve_models", "run", "run_inference", "run_train", "try_with_decay"]
