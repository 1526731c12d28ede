"""ThriftyNet as a searched architecture (Coiffier, Boukli Hacene, Gripon 2020, arXiv 2007.10106).

Not a compressor: the method builds a :class:`~autoslim.models.thriftynet.ThriftyNet`
from its knobs (the study's ``model`` is ignored) and trains it from scratch
with the study's training budget. The width is either ``filters`` or, when
``filters`` is 0, the largest f whose parameter count fits ``budget`` for the
sampled T, h and conv type (the official code's ``--n-params`` reading: a
bigger T or h leaves fewer filters). Architecture details, the formulas and
the alpha initialisation are in :mod:`autoslim.models.thriftynet`. Given a
parameter target (a study with ``constraints.max_params``) the budget is the
target (:meth:`ThriftyNetMethod.with_target`; a warm-start trial's published
budget is capped at it); a target below the smallest network of the trial's T, h
and conv (one filter) prunes the trial before it trains
(:class:`~autoslim.errors.TargetUnreachable`).

>>> from autoslim.methods import get_method
>>> method = get_method("thriftynet")
>>> params = method.search_space().complete({"budget": 40000}, where="params")  # what a trial's config holds
>>> net = method.build_model(params, in_shape=(3, 32, 32), num_classes=10)
>>> net.filters, sum(p.numel() for p in net.parameters())
(163, 39636)
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from autoslim.errors import TargetUnreachable
from autoslim.measure import count_params
from autoslim.methods.base import CompressionResult, Method, TrialContext, register_method
from autoslim.models.thriftynet import ThriftyNet, width_for_budget
from autoslim.selection import SizeTarget


@register_method
class ThriftyNetMethod(Method):
    """Build a ThriftyNet from the sampled knobs; :meth:`compress` only trains it."""

    name = "thriftynet"
    builds_model = True
    size_knobs = ("budget",)
    target_measures = ("params",)

    def with_target(self, params: Mapping[str, Any], target: SizeTarget) -> dict:
        """``budget`` is the target (under a cap: the smaller of the two); ``filters`` is then derived from it."""
        budget = target.value if not target.cap else min(params["budget"], target.value)
        return {**params, "budget": budget, "filters": 0}

    def build_model(self, params: Mapping[str, Any], *, in_shape, num_classes: int) -> nn.Module:
        """The ThriftyNet of ``params`` (every knob of the search space, as a trial's config holds them)."""
        try:
            f = params["filters"] or width_for_budget(params["budget"], T=params["iterations"], h=params["history"],
                                                      conv=params["conv"], num_classes=num_classes)
        except ValueError as e:  # a budget (a trial's target) below the smallest network of this T and h
            raise TargetUnreachable(f"thriftynet: {e}") from None
        return ThriftyNet(in_shape=in_shape, num_classes=num_classes, filters=f, iterations=params["iterations"],
                          history=params["history"], pool_every=params["pool_every"], conv=params["conv"],
                          activation=params["activation"])

    def compress(self, model: nn.Module, ctx: TrialContext, params: Mapping[str, Any]) -> CompressionResult:
        ctx.train(model, phase="train")
        return CompressionResult(model, info={"filters": model.filters, "params": count_params(model),
                                              "pool_at": sorted(model.pool_at)})
