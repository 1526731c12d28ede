"""Sparse Structure Selection (Huang and Wang 2018, arXiv 1707.01213): scaling factors, APG, adaptive width and depth.

A learnable factor (initialised to 1) multiplies the output of every structure:

- ``channel``: each channel before its activation, i.e. after its BatchNorm (VGG,
  and the internal channels of every ResNet BasicBlock), or after the conv/linear
  layer itself where no BatchNorm follows (LeNets). Channels tied across a
  residual stream get no factor.
- ``block``: the residual branch of every BasicBlock,
  ``r_{i+1} = relu(shortcut(r_i) + lambda_i * F(r_i))`` (the factor sits after ``bn2``).

The weights train with SGD + Nesterov momentum and weight decay; the factors
train with :class:`APG` only (no weight decay), which applies the penalty
``gamma * ||lambda||_1`` by soft thresholding; its ``eta_t`` is the weights' lr
under the same schedule, so sparsification fades as the lr decays. After training the factors are
folded into the layer they scale (BatchNorm weight and bias, or the conv/linear
weight and bias), so the model is made of standard layers again, then every
channel whose factor is ``<= threshold`` (exact zeros at ``threshold: 0``) is
removed (:func:`autoslim.surgery.remove_channels`; a group keeps its largest
channel) and every block whose factor is ``<= threshold`` is replaced by its
shortcut (:func:`autoslim.surgery.remove_blocks`): the network gets shallower.
Removing a zero structure keeps the network's function exactly (the activation
after a scaled channel maps 0 to 0, as ReLU does). One training pass, then an
optional fine-tune (``finetune_epochs`` at a tenth of the learning rate; not in
the paper).

>>> p = nn.Parameter(torch.tensor([1.0, 0.004]))
>>> p.grad = torch.tensor([0.0, 0.0])
>>> APG([p], lr=0.1, gamma=0.05).step()  # soft threshold 0.1 * 0.05 = 0.005
>>> [round(v, 6) for v in p.tolist()]  # 1 - 0.005 - 0.9 * 0.005, and 0.004 -> exactly 0
[0.9905, 0.0]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from autoslim.methods.base import CompressionResult, Method, TrialContext, register_method
from autoslim.models.resnet import BasicBlock
from autoslim.surgery import channel_groups, remove_blocks, remove_channels

FINETUNE_LR_SCALE = 0.1
LEVELS = ("channel", "block", "both")


class APG(torch.optim.Optimizer):
    """The modified stochastic Accelerated Proximal Gradient of SSS, for the scaling factors.

    The parameter holds the look-ahead point ``lambda'`` (where the gradient is
    taken); the state holds ``v``. With ``eta_t`` the group's (scheduled) lr::

        z_t       = lambda'_{t-1} - eta_t * grad(lambda'_{t-1})
        v_t       = S_{eta_t*gamma}(z_t) - lambda'_{t-1} + mu * v_{t-1}
        lambda'_t = max(S_{eta_t*gamma}(z_t) + mu * v_t, 0)

    ``S_a(z) = sign(z) * max(|z| - a, 0)``; ``v_0 = 0`` and the first step is a
    full step. The clamp at 0 follows the official code; there is no weight decay.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, gamma: float, momentum: float = 0.9) -> None:
        if lr < 0 or gamma < 0 or not 0 <= momentum < 1:
            raise ValueError(f"APG: expected lr >= 0, gamma >= 0, 0 <= momentum < 1; got {lr}, {gamma}, {momentum}")
        super().__init__(params, {"lr": lr, "gamma": gamma, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eta, gamma, mu = group["lr"], group["gamma"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                v = self.state[p].setdefault("v", torch.zeros_like(p))
                z = p - eta * p.grad
                s = z.sign() * (z.abs() - eta * gamma).clamp_min(0)
                v.mul_(mu).add_(s - p)
                p.copy_(s + mu * v).clamp_(min=0)
        return loss


@dataclasses.dataclass
class Scale:
    """One structure's factor: ``structure`` is a channel-group name or a block name; ``site`` the scaled module."""

    kind: str
    structure: str
    site: str
    factor: nn.Parameter


class Scales:
    """Scaling factors attached to ``model`` by forward hooks (they are not parameters of the model).

    >>> from autoslim.models import create_model
    >>> model = create_model("resnet20", in_shape=(1, 8, 8), num_classes=3)
    >>> scales = Scales(model, level="both", example_input=torch.zeros(2, 1, 8, 8))
    >>> sum(s.kind == "block" for s in scales), sum(s.kind == "channel" for s in scales)
    (9, 9)
    """

    def __init__(self, model: nn.Module, *, level: str, example_input: torch.Tensor) -> None:
        if level not in LEVELS:
            raise ValueError(f"level: unknown value {level!r}; accepted: {', '.join(LEVELS)}")
        self.model = model
        device = example_input.device
        self.scales: list[Scale] = []
        if level in ("channel", "both"):
            for g in channel_groups(model, example_input=example_input):
                if len(g.producers) == 1 and len(g.batchnorms) <= 1:
                    site = (g.batchnorms or g.producers)[0]
                    self.scales.append(Scale("channel", g.name, site, nn.Parameter(torch.ones(g.size, device=device))))
        if level in ("block", "both"):
            for name, m in model.named_modules():
                if isinstance(m, BasicBlock):
                    self.scales.append(Scale("block", name, f"{name}.bn2", nn.Parameter(torch.ones(1, device=device))))
        if not self.scales:
            raise ValueError(f"sss: {type(model).__name__} has no structure to scale at level {level!r}")
        modules = dict(model.named_modules())
        self._handles = [modules[s.site].register_forward_hook(_multiplier(s.factor)) for s in self.scales]

    def __iter__(self) -> Iterator[Scale]:
        return iter(self.scales)

    def parameters(self) -> list[nn.Parameter]:
        return [s.factor for s in self.scales]

    @torch.no_grad()
    def fold(self) -> None:
        """Multiply every factor into its site's weight and bias and remove the hooks: standard layers again."""
        for h in self._handles:
            h.remove()
        modules = dict(self.model.named_modules())
        for s in self.scales:
            site = modules[s.site]
            site.weight.mul_(s.factor.view(-1, *[1] * (site.weight.dim() - 1)))
            if site.bias is not None:
                site.bias.mul_(s.factor)


def _multiplier(factor: nn.Parameter):
    def hook(module, inputs, out):
        return out * factor.view(1, -1, *[1] * (out.dim() - 2))
    return hook


def remove_zero_structures(model: nn.Module, scales: Scales, *, threshold: float,
                           example_input: torch.Tensor) -> tuple[nn.Module, dict]:
    """Fold ``scales`` into ``model``, then remove every structure whose factor is ``<= threshold``.

    Returns the new model and what was removed (``channels``: {group: count}, ``blocks``: names).
    """
    scales.fold()
    keep, removed = {}, {}
    for s in scales:
        if s.kind == "channel":
            kept = s.factor > threshold
            if not kept.any():
                kept[s.factor.argmax()] = True
            keep[s.structure] = torch.nonzero(kept).flatten().cpu()
            removed[s.structure] = int((~kept).sum())
    blocks = [s.structure for s in scales if s.kind == "block" and s.factor.item() <= threshold]
    if keep:
        model = remove_channels(model, keep, example_input=example_input)
    if blocks:
        model = remove_blocks(model, blocks)
    return model, {"channels": removed, "blocks": blocks}


@register_method
class SparseStructureSelection(Method):
    name = "sss"

    def compress(self, model: nn.Module, ctx: TrialContext, params: Mapping[str, Any]) -> CompressionResult:
        example = ctx.data.val.x[:8]
        config = dataclasses.replace(ctx.train_config, nesterov=True)
        scales = Scales(model, level=params["level"], example_input=example)
        apg = APG(scales.parameters(), lr=config.lr, gamma=params["gamma"])
        ctx.train(model, phase="sparse", config=config, extra_optimizers=[apg])
        factors = {s.structure: [round(v, 4) for v in s.factor.tolist()] for s in scales}
        model, removed = remove_zero_structures(model, scales, threshold=params["threshold"], example_input=example)
        ctx.log(f"sss: removed {sum(removed['channels'].values())} channels and {len(removed['blocks'])} blocks"
                + (f" ({', '.join(removed['blocks'])})" if removed["blocks"] else ""))
        ctx.train(model, epochs=params["finetune_epochs"], phase="finetune", config=config,
                  lr_scale=FINETUNE_LR_SCALE)
        return CompressionResult(model, info={**removed, "factors": factors})
