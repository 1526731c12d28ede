"""Measurements of a (compressed) model: parameters, non-zeros, FLOPs, latency, bytes.

Measurement does not know which method produced a model.

- ``params``: every element of every parameter (what a dense implementation stores).
- ``nonzeros``: parameter elements that are not exactly zero.
- ``flops``: torch's own count (:class:`torch.utils.flop_counter.FlopCounterMode`) of one
  forward pass on one input; it counts 2 FLOPs per multiply-accumulate of
  convolutions and matrix products (element-wise ops are not counted).
- ``latency_ms``: wall time of a batch-1 forward on the CPU, in eval mode, on one
  thread: :class:`torch.utils.benchmark.Timer`'s ``blocked_autorange`` (warm-up,
  then blocks of calls for ``latency_time`` seconds; the median of the blocks), after
  two warm-up calls of its own, so a slow first call or a moment of contention is not
  the number. ``latency_iqr_ms`` is the spread (interquartile range) of the blocks.
  Unstructured sparsity does not lower it: there are no sparse kernels.
- ``size_bytes``: bytes of ``torch.save(model.state_dict())``.

>>> from autoslim.models import create_model
>>> m = measure(create_model("lenet5", in_shape=(1, 28, 28), num_classes=10), in_shape=(1, 28, 28))
>>> m.params, m.flops
(431080, 4586000)
"""

from __future__ import annotations

import copy
import io
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

# Seconds of timed blocks per latency measurement (about a tenth of a second per trial).
LATENCY_TIME = 0.1


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
def latency(model: nn.Module, *, in_shape, min_run_time: float = LATENCY_TIME, warmup: int = 2) -> tuple[float, float]:
    """Median and interquartile range, in ms, of a batch-1 forward of ``model`` on the CPU (one thread).

    >>> median, iqr = latency(nn.Linear(8, 4), in_shape=(8,))
    >>> 0 < median < 10 and 0 <= iqr
    True
    """
    model = _cpu_eval(model)
    x = torch.randn(1, *in_shape)
    for _ in range(warmup):
        model(x)
    timed = Timer("model(x)", globals={"model": model, "x": x}, num_threads=1).blocked_autorange(
        min_run_time=min_run_time)
    return 1000 * timed.median, 1000 * timed.iqr


def latency_ms(model: nn.Module, *, in_shape, min_run_time: float = LATENCY_TIME) -> float:
    """The median of :func:`latency`."""
    return latency(model, in_shape=in_shape, min_run_time=min_run_time)[0]


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
