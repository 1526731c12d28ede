"""Measurements of a (compressed) model: parameters, non-zeros, FLOPs, latency, bytes.

Measurement does not know which method produced a model.

- ``params``: every element of every parameter (what a dense implementation stores).
- ``nonzeros``: parameter elements that are not exactly zero.
- ``flops``: torch's own count (:class:`torch.utils.flop_counter.FlopCounterMode`) of one
  forward pass on one input; it counts 2 FLOPs per multiply-accumulate of
  convolutions and matrix products (element-wise ops are not counted).
- ``latency_ms``: wall time of a batch-1 forward on the CPU, in eval mode, on one
  thread, timed with :class:`torch.utils.benchmark.Timer` after warm-up calls: the
  median of 9 blocks of calls that take ``latency_time`` seconds (0.05) in all, so a
  slow first call or a moment of contention elsewhere is not the number.
  ``latency_iqr_ms`` is the spread (interquartile range) of the blocks. Unstructured
  sparsity does not lower it: there are no sparse kernels.
- ``size_bytes``: bytes of ``torch.save(model.state_dict())``.

>>> from autoslim.models import create_model
>>> m = measure(create_model("lenet5", in_shape=(1, 28, 28), num_classes=10), in_shape=(1, 28, 28))
>>> m.params, m.flops
(431080, 4586000)
"""

from __future__ import annotations

import copy
import io
import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Seconds of timed calls per latency measurement, and in how many blocks (the median block is the latency).
LATENCY_TIME = 0.05
LATENCY_BLOCKS = 9


@dataclass
class Measurements:
    params: int
    nonzeros: int
    flops: int
    latency_ms: float
    size_bytes: int
    latency_iqr_ms: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzeros(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, *, in_shape) -> int:
    model = _cpu_eval(model)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *in_shape))
    return int(counter.get_total_flops())


@torch.no_grad()
def latency(model: nn.Module, *, in_shape, min_run_time: float = LATENCY_TIME,
            blocks: int = LATENCY_BLOCKS) -> tuple[float, float]:
    """Median and interquartile range, in ms, of a batch-1 forward of ``model`` on the CPU (one thread).

    With :class:`torch.utils.benchmark.Timer`: after its warm-up calls and a few calls that size the
    blocks, ``blocks`` blocks of equal size take about ``min_run_time`` seconds in all (at least one
    call each, at least 3 blocks); each block is timed after a warm-up of its own, and the statistics
    are those of :meth:`torch.utils.benchmark.Measurement.merge` of the blocks.

    >>> median, iqr = latency(nn.Linear(8, 4), in_shape=(8,))
    >>> 0 < median < 10 and 0 <= iqr
    True
    """
    from torch.utils.benchmark import Measurement

    model = _cpu_eval(model)
    timer = _timer()("model(x)", globals={"model": model, "x": torch.randn(1, *in_shape)}, num_threads=1)
    per_call = timer.timeit(number=3).mean
    blocks = max(3, min(blocks, int(min_run_time / per_call)))
    number = max(1, int(min_run_time / blocks / per_call))
    (merged,) = Measurement.merge([timer.timeit(number=number) for _ in range(blocks)])
    return 1000 * merged.median, 1000 * merged.iqr


def latency_ms(model: nn.Module, *, in_shape, min_run_time: float = LATENCY_TIME) -> float:
    """The median of :func:`latency`."""
    return latency(model, in_shape=in_shape, min_run_time=min_run_time)[0]


def _timer() -> type:
    """:class:`torch.utils.benchmark.Timer`, imported quietly: the import loads torch's C++ extension builder,
    which warns on stderr on a machine with a CUDA_HOME but no CUDA, and bad-input errors must stay one line."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        logger.setLevel(level)
    return Timer


def saved_size(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def measure(model: nn.Module, *, in_shape, latency_time: float = LATENCY_TIME,
            size_bytes: int | None = None) -> Measurements:
    """All measurements of ``model`` for inputs of shape ``in_shape``.

    ``latency_time`` is the seconds of timed blocks of the latency measurement
    (:func:`latency`). ``size_bytes`` overrides the dense ``state_dict`` size
    where a method saves its model in another encoding (a sparse one)."""
    median, iqr = latency(model, in_shape=in_shape, min_run_time=latency_time)
    return Measurements(params=count_params(model), nonzeros=count_nonzeros(model),
                        flops=count_flops(model, in_shape=in_shape), latency_ms=median, latency_iqr_ms=iqr,
                        size_bytes=saved_size(model) if size_bytes is None else size_bytes)


def _cpu_eval(model: nn.Module) -> nn.Module:
    """A CPU copy in eval mode (the caller's model keeps its device and mode)."""
    return copy.deepcopy(model).cpu().eval()


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv and linear layer (channels / neurons), by qualified name."""
    return {name: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def layer_density(model: nn.Module) -> dict[str, float]:
    """Fraction of non-zero weights of every conv and linear layer, by qualified name."""
    return {name: float(torch.count_nonzero(m.weight)) / m.weight.numel()
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
