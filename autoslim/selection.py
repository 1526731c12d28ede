"""Selection: between a method's importance scores and the surgery, which channels survive.

What to remove first is each method's (its importance: APoZ for trimming,
filter norms for l1/l2, |scaling factor| for SSS; higher = more important).
How many and which survive the study's rules is decided here, once, for every
structured method (:class:`~autoslim.config.PruningConfig`, the study file's
``pruning:`` section):

- ``ignore``: a channel group is left whole if any of its producers is an
  ignored layer (channels tied together are removed together), a residual
  branch if it or a layer inside it is; :func:`check_ignore` refuses, before
  training, a pattern that matches no layer of the model.
- ``round_to`` and GroupNorm ``granularity``: a group keeps a multiple of
  ``lcm(round_to, granularity)`` channels (its *unit*, :func:`unit`), the
  count the method's rule keeps rounded *up*, never above the group's width;
  a group narrower than its unit keeps all its channels. The extra channels
  are those of highest importance among the ones the rule removed.
- every group keeps at least one unit.

Two ways to say how many: :func:`select` with ``remove`` (the method's own
rule, a mask per group: trimming's APoZ threshold, l1/l2's and SSS's small
filters and factors), or with ``target_params`` (``target_flops``): the
channels of all groups are ranked together by importance and removed, a unit
at a time per group, lowest first, until the network has at most that many
parameters (FLOPs), counted exactly (:class:`autoslim.surgery.SizeCount`).
The result then lies
within one step (one unit of one group) of the target: it fits, and putting
back the last step would not.

>>> import torch
>>> from autoslim.config import PruningConfig
>>> from autoslim.surgery import ChannelGroup
>>> g = ChannelGroup(name="conv", producers=("conv",), size=20)
>>> scores = {"conv": torch.arange(20.0)}  # channel j has importance j
>>> rule = {"conv": torch.arange(20) < 15}  # the method's rule removes 15 of 20 channels: 5 stay
>>> select([g], scores, PruningConfig(round_to=8), remove=rule).keep["conv"]  # 5 rounded up to 8
[12, 13, 14, 15, 16, 17, 18, 19]
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from autoslim.config import PruningConfig
from autoslim.errors import UsageError
from autoslim.surgery import ChannelGroup, SizeCount
from autoslim.surgery.count import MEASURES

IGNORE_RULE = "qualified module names ('classifier.fc1') or glob patterns ('classifier.*')"


def ignored(name: str, rules: PruningConfig) -> bool:
    """Whether layer ``name`` is ignored: a pattern matches it or a module it lies in.

    >>> rules = PruningConfig(ignore=["classifier.*", "layer4"])
    >>> ignored("classifier.fc1", rules), ignored("layer4.1.conv2", rules), ignored("layer3.0.conv1", rules)
    (True, True, False)
    """
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pattern) for pattern in rules.ignore for p in prefixes)


def check_ignore(model: nn.Module, rules: PruningConfig) -> None:
    """Refuse, in one line naming it, an ``ignore`` pattern that matches no layer of ``model``."""
    names = [n for n, _ in model.named_modules() if n]
    for pattern in rules.ignore:
        if not any(ignored(n, PruningConfig(ignore=[pattern])) for n in names):
            raise UsageError(f"pruning.ignore: {pattern!r} matches no layer of {type(model).__name__}; accepted: "
                             f"{IGNORE_RULE}{f', e.g. {names[-1]!r}' if names else ''}")


def prunable(groups: Iterable[ChannelGroup], rules: PruningConfig) -> list[ChannelGroup]:
    """The groups none of whose producers is ignored."""
    return [g for g in groups if not any(ignored(p, rules) for p in g.producers)]


def prunable_block(name: str, module_names: Iterable[str], rules: PruningConfig) -> bool:
    """Whether residual branch ``name`` may be removed: neither it nor a layer inside it is ignored."""
    return not any(ignored(n, rules) for n in (name, *(m for m in module_names if m.startswith(name + "."))))


def refuse_if_all_ignored(method: str, model: nn.Module, found: Sequence, kept: Sequence,
                          rules: PruningConfig) -> None:
    """A UsageError when ``rules.ignore`` leaves none of the ``found`` structures to ``method``."""
    if found and not kept:
        raise UsageError(f"pruning.ignore: {', '.join(map(repr, rules.ignore))} leaves {method} nothing to prune "
                         f"in {type(model).__name__} (it ignores all of its {len(found)} structure(s))")


def unit(group: ChannelGroup, rules: PruningConfig) -> int:
    """The channels a group's width moves by: ``lcm(round_to, granularity)``."""
    return math.lcm(rules.round_to, group.granularity)


def rounded(kept: int, group: ChannelGroup, rules: PruningConfig) -> int:
    """``kept`` channels of ``group`` rounded up to its :func:`unit` (at least one unit), at most its width.

    >>> g = ChannelGroup(name="c", producers=("c",), size=20)
    >>> [rounded(k, g, PruningConfig(round_to=8)) for k in (0, 5, 8, 9, 17)]
    [8, 8, 8, 16, 20]
    >>> rounded(3, ChannelGroup(name="c", producers=("c",), size=6), PruningConfig(round_to=8))  # narrower
    6
    """
    u = unit(group, rules)
    return min(group.size, max(1, math.ceil(kept / u)) * u)


def block_scores(scores: torch.Tensor, granularity: int) -> torch.Tensor:
    """One importance per block of ``granularity`` channels (their mean)."""
    return scores.detach().double().cpu().view(-1, granularity).mean(1)


@dataclass
class Selection:
    """What survives: ``keep`` {group: kept channels, sorted} of every selected group (ignored ones left out);
    with a target, ``size`` the predicted count (parameters, or FLOPs for a FLOPs target), ``target`` the
    target, ``reached`` whether the network fits it (else every group is at its narrowest), ``last`` the last
    removal step (group, channels: one unit of one group, or what lies above the group's first multiple) and
    ``over`` the count with it put back (above the target: the selection lies within one step of it); both None
    when nothing was removed."""

    keep: dict[str, list[int]]
    size: int | None = None
    target: int | None = None
    reached: bool = True
    over: int | None = None
    last: tuple[str, list[int]] | None = None


def select(groups: Iterable[ChannelGroup], scores: Mapping[str, torch.Tensor], rules: PruningConfig, *,
           remove: Mapping[str, torch.Tensor] | None = None, target_params: int | None = None,
           target_flops: int | None = None, counter: SizeCount | None = None) -> Selection:
    """The channels that survive in each of ``groups`` present in ``scores`` (per-channel importance, higher =
    kept first), ignored groups left whole: by the method's rule ``remove`` ({group: bool mask of the channels
    it removes}, whole GroupNorm blocks), or by ``target_params`` or ``target_flops`` (with ``counter``, a
    :class:`~autoslim.surgery.SizeCount` of the same model and measure): see the module docstring. Scores of a
    target are compared across groups as given (the method makes them comparable)."""
    chosen = [g for g in prunable(groups, rules) if g.name in scores]
    for measure, target in (("params", target_params), ("flops", target_flops)):
        if target is not None:
            if counter is None or counter.measure != measure:
                raise ValueError(f"select: target_{measure} needs the model's SizeCount(..., measure={measure!r})")
            return _select_target(chosen, scores, rules, target, counter)
    if remove is None:
        raise ValueError("select: give the method's rule (remove=...) or a target (target_params/target_flops=...)")
    keep = {}
    for g in chosen:
        gran = g.granularity
        by_rule = ~remove[g.name].view(-1, gran).all(1).cpu() if g.name in remove else torch.ones(g.size // gran,
                                                                                                  dtype=torch.bool)
        count = rounded(int(by_rule.sum()) * gran, g, rules) // gran
        importance = block_scores(scores[g.name], gran).tolist()
        order = sorted(range(len(by_rule)), key=lambda b: (not by_rule[b], -importance[b]))
        keep[g.name] = _channels(order[:count], gran)
    return Selection(keep)


@dataclass(frozen=True)
class SizeTarget:
    """A size a structured method removes channels down to, in its own importance order: ``value`` parameters
    (``measure="params"``) or FLOPs (``"flops"``). With ``cap`` it is a ceiling: the method's own rule decides,
    and only where that rule leaves more does removal go on down to ``value`` (:func:`capped`)."""

    value: int
    measure: str = "params"
    cap: bool = False

    def __post_init__(self) -> None:
        if self.measure not in MEASURES or self.value < 0:
            raise ValueError(f"SizeTarget: expected a count >= 0 of {' or '.join(MEASURES)}, got {self}")


def round_goal(current: int, target: int, rounds_left: int) -> int:
    """The count one of ``rounds_left`` rounds removes down to: the same ratio each round, the target at the last.

    >>> round_goal(1000, 10, 2), round_goal(100, 10, 1), round_goal(5, 10, 3)
    (100, 10, 10)
    """
    if current <= target or rounds_left <= 1:
        return target
    return round(current * (target / current) ** (1 / rounds_left))


def select_to(target: SizeTarget, groups: Iterable[ChannelGroup], scores: Mapping[str, torch.Tensor],
              rules: PruningConfig, *, model: nn.Module, example_input: torch.Tensor,
              rounds_left: int = 1) -> Selection:
    """:func:`select` down to ``target`` on ``model`` (or, with ``rounds_left`` > 1, down to this round's share of
    the way there: :func:`round_goal`)."""
    counter = SizeCount(model, example_input=example_input, measure=target.measure)
    goal = round_goal(counter.count({}), target.value, rounds_left)
    return select(groups, scores, rules, counter=counter, **{f"target_{target.measure}": goal})


def capped(target: SizeTarget, keep: Mapping[str, Sequence[int]], groups: Iterable[ChannelGroup],
           scores: Mapping[str, torch.Tensor], rules: PruningConfig, *, model: nn.Module,
           example_input: torch.Tensor) -> Selection | None:
    """Under a cap (:attr:`SizeTarget.cap`): None when the rule's ``keep`` fits ``target``, else the selection
    down to it in the method's importance order (:func:`select_to`).

    >>> from autoslim.models import create_model
    >>> model = create_model("lenet5", in_shape=(1, 28, 28), num_classes=10)
    >>> x, groups = torch.zeros(1, 1, 28, 28), []
    >>> capped(SizeTarget(10**6, cap=True), {}, groups, {}, PruningConfig(), model=model, example_input=x) is None
    True
    """
    counter = SizeCount(model, example_input=example_input, measure=target.measure)
    if counter.count(keep) <= target.value:
        return None
    return select_to(target, groups, scores, rules, model=model, example_input=example_input)


def target_info(selection: Selection, target: SizeTarget) -> dict:
    """What a method records of a target selection (``info["target"]``)."""
    return {"measure": target.measure, "value": target.value, "selected": selection.size, "over": selection.over,
            "reached": selection.reached and selection.size <= target.value}


def target_line(method: str, info: Mapping) -> str:
    """The line a method logs for a target selection (its :func:`target_info`)."""
    return (f"{method}: target {info['value']:,} {info['measure']}: selected {info['selected']:,}"
            + ("" if info["reached"] else " (the narrowest network the rules allow; the target is not reached)"))


def _channels(blocks: Iterable[int], granularity: int) -> list[int]:
    return sorted(b * granularity + i for b in blocks for i in range(granularity))


def _steps(g: ChannelGroup, scores: torch.Tensor, rules: PruningConfig) -> list[tuple[float, list[int]]]:
    """The removal steps of ``g``, in order: (importance of the step, the blocks it removes), from its width down
    to one unit through the multiples of its unit, lowest importance first."""
    gran = g.granularity
    per_block = block_scores(scores, gran)
    order = torch.argsort(per_block, stable=True).tolist()
    u = unit(g, rules)
    levels = [g.size] + [k for k in range((g.size - 1) // u * u, 0, -u)]  # kept widths, widest first
    steps = []
    for wide, narrow in zip(levels, levels[1:]):
        blocks = order[(g.size - wide) // gran:(g.size - narrow) // gran]
        steps.append((float(per_block[blocks].mean()), blocks))
    return steps


def _select_target(groups: list[ChannelGroup], scores: Mapping[str, torch.Tensor], rules: PruningConfig,
                   target: int, counter: SizeCount) -> Selection:
    """Remove steps of all ``groups`` in order of importance until ``counter`` says the model fits ``target``."""
    steps = sorted(((score, i, k, g, blocks) for i, g in enumerate(groups)
                    for k, (score, blocks) in enumerate(_steps(g, scores[g.name], rules))),
                   key=lambda s: (s[0], s[1], s[2]))
    full = counter.kept(torch.ones(1, counter.channels, dtype=torch.float64))
    deltas = torch.zeros(len(steps), full.shape[1], dtype=torch.float64)
    for s, (_, _, _, g, blocks) in enumerate(steps):
        deltas[s] = counter.multiplicity[:, counter.index(g.name, _channels(blocks, g.granularity))].sum(1)
    counts = counter.counts_of_kept(torch.cat([full, full - deltas.cumsum(0)]))  # after 0, 1, ... steps
    fits = torch.nonzero(counts <= target + 0.5).flatten()
    taken = int(fits[0]) if len(fits) else len(steps)
    removed: dict[str, set[int]] = {g.name: set() for g in groups}
    for _, _, _, g, blocks in steps[:taken]:
        removed[g.name].update(_channels(blocks, g.granularity))
    keep = {g.name: [j for j in range(g.size) if j not in removed[g.name]] for g in groups}
    last = None
    if taken:
        *_, group, blocks = steps[taken - 1]
        last = (group.name, _channels(blocks, group.granularity))
    return Selection(keep, size=int(round(counts[taken].item())), target=target, reached=bool(len(fits)),
                     over=int(round(counts[taken - 1].item())) if taken else None, last=last)
