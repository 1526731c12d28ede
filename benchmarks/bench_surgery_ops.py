"""autoslim.surgery next to torch-pruning on the ops added for issue 16, measured against the masked model.

For each model a random third of every channel group found by autoslim (in
whole GroupNorm blocks) is zeroed, with the BatchNorm/GroupNorm entries that
then see only zeros: the masked model. autoslim removes exactly those
channels (:func:`autoslim.surgery.remove_channels`); torch-pruning runs
``MagnitudePruner`` with L1 importance and ``pruning_ratio=1/3`` (the classifier
kept), which should pick the zeroed channels where its groups agree. Printed
per tool: parameters after, wall time of the removal (one thread), and the
relative output error against the masked model, or the exception. The
hand-written models are those of ``tests/test_surgery_ops.py``.

    python benchmarks/bench_surgery_ops.py [model ...]

torch-pruning 1.6.1 did not finish swin_t in 3 minutes on one CPU thread.

Exits 2 with a hint when torch-pruning is not installed.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from autoslim.surgery import remove_channels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_surgery_ops as models  # noqa: E402  (the hand-written models and the masking of the tests)

try:
    import torch_pruning as tp
except ImportError:
    print("torch-pruning is not installed: pip install torch-pruning")
    sys.exit(2)

MODELS = {
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10), (3, 32, 32)),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=10), (3, 32, 32)),
    "swin_t": (lambda: torchvision.models.swin_t(num_classes=10), (3, 32, 32)),
    "groupnorm_prelu": (lambda: models.randomize_group_norms(models.Norms()), (3, 7, 7)),
    "custom_scales": (models.ScaleNet, (3, 7, 7)),
    "upsample_pad": (models.UpsamplePad, (3, 6, 6)),
    "view_computed": (lambda: models.Views(False), (3, 8, 8)),
    "view_literal": (lambda: models.Views(True), (3, 8, 8)),
    "channel_last_block": (models.ChannelLast, (3, 8, 8)),
    "weight_norm": (lambda: models.NormedConvs(nn.utils.parametrizations.weight_norm), (3, 7, 7)),
    "spectral_norm": (lambda: models.NormedConvs(nn.utils.parametrizations.spectral_norm), (3, 7, 7)),
    "conv1d": (models.Sequence1d, (4, 9)),
}


def with_torch_pruning(model: nn.Module, x: torch.Tensor, keep: dict) -> nn.Module:
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=1 / 3,
                              ignored_layers=[classifier]).step()
    return model


def with_autoslim(model: nn.Module, x: torch.Tensor, keep: dict) -> nn.Module:
    return remove_channels(model, keep, example_input=x)


def cell(prune, model: nn.Module, x: torch.Tensor, keep: dict, reference: torch.Tensor) -> str:
    start = time.perf_counter()
    try:
        small = prune(copy.deepcopy(model), x, keep)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            out = small.eval()(x)
    except Exception as e:  # the point is to report how each tool fails
        return f"{type(e).__name__}: {str(e)[:50]}"
    error = models.relative_error(out, reference) if out.shape == reference.shape else float("nan")
    return f"{models.n_params(small):>11,d} {seconds * 1000:6.0f} ms  err {error:.0e}"


def main() -> None:
    torch.set_num_threads(1)
    names = sys.argv[1:] or list(MODELS)
    print(f"{'model':20s} {'params':>11s} | {'autoslim':32s} | torch-pruning")
    for name in names:
        build, shape = MODELS[name]
        torch.manual_seed(0)
        model, x = models.randomize(build()), torch.randn(2, *shape)
        gone, keep = models.fraction_of_groups(model, x)
        models.mask(model, x, gone)
        with torch.no_grad():
            reference = model(x)
        print(f"{name:20s} {models.n_params(model):>11,d} | {cell(with_autoslim, model, x, keep, reference):32s} | "
              f"{cell(with_torch_pruning, model, x, keep, reference)}", flush=True)


if __name__ == "__main__":
    main()
