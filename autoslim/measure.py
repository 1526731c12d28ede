"""Measurements of a (compressed) model: parameters, non-zeros, FLOPs, latency, bytes.

Measurement does not know which method produced a model.

- ``params``: every element of every parameter (what a dense implementation stores).
- ``nonzeros``: parameter elements that are not exactly zero.
- ``flops``: torch's own count (:class:`torch.utils.flop_counter.FlopCounterMode`) of one
  forward pass on one input; it counts 2 FLOPs per multiply-accumulate of
  convolutions and matrix products (element-wise ops are not counted).
- ``latency_ms``: wall time of a forward pass in eval mode, timed with
  :class:`torch.utils.benchmark.Timer` (which synchronises CUDA) after warm-up calls:
  the median of 9 blocks of calls that take ``time`` seconds in all, so a slow first
  call or a moment of contention elsewhere is not the number. By default a batch of
  one on the CPU, on one thread, in PyTorch; :class:`autoslim.config.LatencyConfig`
  (a study file's ``latency:``) sets the batch size, the device, the thread count and
  the runtime (PyTorch, or ONNX Runtime on the model exported as ``autoslim export``
  exports it). ``latency_iqr_ms`` is the spread (interquartile range) of the blocks.
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
import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autoslim.config import LatencyConfig

# In how many blocks the timed calls of a latency measurement run (the median block is the latency).
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
def latency(model: nn.Module, *, in_shape, config: LatencyConfig | None = None, device: str | torch.device = "cpu",
            blocks: int = LATENCY_BLOCKS) -> tuple[float, float]:
    """Median and interquartile range, in ms, of a forward pass of ``model`` as ``config`` says (default: a
    batch of one on the CPU, one thread, PyTorch); ``device`` is the study's, used where ``config.device`` is
    ``study``.

    With :class:`torch.utils.benchmark.Timer`: after its warm-up calls and a few calls that size the
    blocks, ``blocks`` blocks of equal size take about ``config.time`` seconds in all (at least one
    call each, at least 3 blocks); each block is timed after a warm-up of its own, and the statistics
    are those of :meth:`torch.utils.benchmark.Measurement.merge` of the blocks. With ``runtime:
    onnxruntime`` the model is exported to ONNX (as ``autoslim export`` does) and an ONNX Runtime CPU
    session is timed the same way.

    >>> median, iqr = latency(nn.Linear(8, 4), in_shape=(8,))
    >>> 0 < median < 10 and 0 <= iqr
    True
    >>> median, iqr = latency(nn.Linear(8, 4), in_shape=(8,), config=LatencyConfig(batch_size=32))
    >>> 0 < median < 10
    True
    """
    from torch.utils.benchmark import Measurement

    config = config or LatencyConfig()
    where = torch.device(device if config.device == "study" else "cpu")
    x = torch.randn(config.batch_size, *in_shape, device=where)
    with tempfile.TemporaryDirectory() as tmp:
        run = (_onnxruntime_call(model, x, Path(tmp) / "model.onnx", threads=config.threads)
               if config.runtime == "onnxruntime" else copy.deepcopy(model).to(where).eval())
        timer = _timer()("run(x)", globals={"run": run, "x": x},
                         num_threads=config.threads or torch.get_num_threads())
        per_call = timer.timeit(number=3).mean
        blocks = max(3, min(blocks, int(config.time / per_call)))
        number = max(1, int(config.time / blocks / per_call))
        (merged,) = Measurement.merge([timer.timeit(number=number) for _ in range(blocks)])
    return 1000 * merged.median, 1000 * merged.iqr


def write_onnx(model: nn.Module, path: str | Path, *, example: torch.Tensor) -> Path:
    """Export ``model`` (in eval mode) to ONNX at ``path``: input ``input``, output ``logits``, any batch size."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return Path(path)


def _onnxruntime_call(model: nn.Module, x: torch.Tensor, path: Path, *, threads: int | None) -> Callable:
    """``model`` exported to ONNX at ``path`` (input ``input``, any batch size) as a function of a CPU
    tensor that runs it in an ONNX Runtime session with ``threads`` intra-op threads."""
    import onnxruntime

    write_onnx(_cpu_eval(model), path, example=x[:1].cpu())
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x.numpy()})


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


def measure(model: nn.Module, *, in_shape, latency_config: LatencyConfig | None = None,
            device: str | torch.device = "cpu", size_bytes: int | None = None) -> Measurements:
    """All measurements of ``model`` for inputs of shape ``in_shape``.

    ``latency_config`` and ``device`` say how latency is measured (:func:`latency`). ``size_bytes``
    overrides the dense ``state_dict`` size where a method saves its model in another encoding (a sparse one)."""
    median, iqr = latency(model, in_shape=in_shape, config=latency_config, device=device)
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
