"""ThriftyNet (Coiffier, Boukli Hacene, Gripon 2020, arXiv 2007.10106): one convolution used T times.

Reading implemented (``docs/methods.md`` section 5 and the official
ResThriftyNet, ``ThriftyBlock``), for T iterations, history h and f filters::

    x_0 = input, channels zero-padded up to f
    for t = 1..T:
        a   = act(conv(x_{t-1}))                                  # the SAME conv every t
        x_t = BN_t(alpha_{t,0} * a + sum_{i=1..h} alpha_{t,i} * x_{t-i})
        if t is a pooling iteration: 2x2 max-pool x_t and every stored x_{t-i}
    y = Linear(global max-pool(x_T))

``conv`` is ``"classic"`` (f->f 3x3) or ``"mb1"`` (depthwise 3x3 then
pointwise 1x1); neither has a bias. Pooling happens after iterations
``pool_every, 2*pool_every, ...`` (the official rule) or after the iterations
listed in ``pool_at`` (1-based), and is skipped once the map is smaller than
2x2, so any input size works. States before the input (``t - i < 0``) do not
exist: their terms are left out of the sum, so ``alpha_{t,i}`` with ``i > t``
(h(h-1)/2 coefficients, 10 for h = 5) is counted but never used.

Alpha initialisation (deliberate; the official code's trap): ``alpha_{t,0} = 0.1``
on the new activation, ``alpha_{t,1} = 0.9`` on the NEWEST state ``x_{t-1}``,
the other shortcuts 0, so every iteration starts as a damped residual step.
The official code stores its history oldest-first and sets ``alpha[t, 1] = 0.9``,
which lands on the oldest slot: for h > 1 the newest state starts at weight 0.

Parameters, with C classes (:func:`thriftynet_params`)::

    mb1:     9f + f^2  + 2fT (BN) + T(h+1) (alphas) + (f+1)C
    classic: 9f^2      + 2fT      + T(h+1)          + (f+1)C

Cost grows as T * f^2 * H * W and the first iterations run at full
resolution: the network is small but compute-heavy. The reference network
costs 459 MFLOPs per 3x32x32 image, 5.6x ResNet-20's 82 with 1/7 of its
parameters, and trains ~4.5x slower on a CPU (``benchmarks/bench_thriftynet.py``).

>>> model = ThriftyNet(in_shape=(3, 32, 32), num_classes=10, filters=163, iterations=30, history=5, pool_every=6)
>>> sum(p.numel() for p in model.parameters()) == thriftynet_params(f=163, T=30, h=5, conv="mb1", num_classes=10) == 39636
True
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autoslim.models.base import register_model

CONVS = ("mb1", "classic")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def thriftynet_params(*, f: int, T: int, h: int, conv: str = "mb1", num_classes: int) -> int:
    """The analytic parameter count of a ThriftyNet (formulas in the module docstring).

    >>> thriftynet_params(f=163, T=30, h=5, conv="mb1", num_classes=10)
    39636
    """
    quadratic, linear = _conv_terms(conv)
    return quadratic * f * f + (linear + 2 * T + num_classes) * f + T * (h + 1) + num_classes


def width_for_budget(budget: int, *, T: int, h: int, conv: str = "mb1", num_classes: int) -> int:
    """The largest number of filters f whose ThriftyNet has at most ``budget`` parameters.

    Exact integer arithmetic: with ``a f^2 + b f + c <= budget`` the answer is
    ``floor((isqrt(b^2 + 4a(budget - c)) - b) / 2a)``.

    >>> width_for_budget(40000, T=30, h=5, conv="mb1", num_classes=10)
    163
    """
    a, lin = _conv_terms(conv)
    b = lin + 2 * T + num_classes
    c = T * (h + 1) + num_classes
    f = (math.isqrt(max(0, b * b + 4 * a * (budget - c))) - b) // (2 * a)
    if f < 1:
        raise ValueError(f"a ThriftyNet with T={T}, h={h}, conv={conv} does not fit in {budget} parameters "
                         f"(1 filter needs {thriftynet_params(f=1, T=T, h=h, conv=conv, num_classes=num_classes)})")
    return f


def _conv_terms(conv: str) -> tuple[int, int]:
    """Coefficients of f^2 and f in the parameter count of the shared convolution."""
    if conv not in CONVS:
        raise ValueError(f"conv: unknown value {conv!r}; accepted: {', '.join(CONVS)}")
    return (1, 9) if conv == "mb1" else (9, 0)


class ThriftyNet(nn.Module):
    """One shared convolution applied ``iterations`` times with learned shortcuts (module docstring).

    ``pool_every`` defaults to ``iterations // 5`` (five poolings, the spacing of
    the official runs: T=30 pools every 6) unless ``pool_at`` is given.
    """

    def __init__(self, *, in_shape: tuple[int, int, int], num_classes: int, filters: int = 163, iterations: int = 30,
                 history: int = 5, pool_every: int | None = None, pool_at: Sequence[int] | None = None,
                 conv: str = "mb1", activation: str = "tanh") -> None:
        super().__init__()
        channels = in_shape[0]
        if filters < channels:
            raise ValueError(f"thriftynet: filters={filters} is below the {channels} input channels")
        if iterations < 1 or history < 1:
            raise ValueError(f"thriftynet: iterations and history must be >= 1, got {iterations}, {history}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: unknown value {activation!r}; accepted: {', '.join(ACTIVATIONS)}")
        _conv_terms(conv)
        if pool_at is not None and pool_every is not None:
            raise ValueError("thriftynet: give pool_every or pool_at, not both")
        if pool_at is None:
            every = pool_every or max(1, iterations // 5)
            pool_at = range(every, iterations + 1, every)
        self.filters, self.iterations, self.history = filters, iterations, history
        self.pool_at = frozenset(pool_at)
        if conv == "classic":
            self.conv = nn.Conv2d(filters, filters, 3, padding=1, bias=False)
        else:
            self.conv = nn.Sequential(OrderedDict(
                depthwise=nn.Conv2d(filters, filters, 3, padding=1, groups=filters, bias=False),
                pointwise=nn.Conv2d(filters, filters, 1, bias=False)))
        self.act = ACTIVATIONS[activation]()
        alpha = torch.zeros(iterations, history + 1)
        alpha[:, 0], alpha[:, 1] = 0.1, 0.9
        self.alpha = nn.Parameter(alpha)
        self.norms = nn.ModuleList(nn.BatchNorm2d(filters) for _ in range(iterations))
        self.classifier = nn.Linear(filters, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last state x_T (N x f x H' x W')."""
        x = F.pad(x, (0, 0, 0, 0, 0, self.filters - x.shape[1]))
        states = [x]  # x_{t-1}, ..., x_{t-h}: newest last
        for t in range(self.iterations):
            alpha = self.alpha[t]
            a = alpha[0] * self.act(self.conv(states[-1]))
            for i, state in enumerate(reversed(states), start=1):
                a = a + alpha[i] * state
            states = [*states, self.norms[t](a)][-self.history:]
            if t + 1 in self.pool_at and min(states[-1].shape[-2:]) >= 2:
                states = [F.max_pool2d(s, 2) for s in states]
        return states[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.amax(self.features(x), dim=(2, 3)))


@register_model("thriftynet")
def thriftynet(*, in_shape, num_classes, **kwargs) -> nn.Module:
    """ThriftyNet; defaults are the official CIFAR-10 network (f=163, T=30, h=5, mb1, tanh, pool every 6)."""
    return ThriftyNet(in_shape=in_shape, num_classes=num_classes, **kwargs)
