"""The compression-method extension point: one small base class and a name-keyed registry.

A method is one module: a :class:`Method` subclass and the search space declaring
its hyperparameters (:meth:`Method.search_space`: a YAML file beside the module,
or the class attribute :attr:`Method.space`). It is found by name: registered
with :func:`register_method`, an installed package's entry point in the group
``autoslim.methods``, or an import string ``package.module:Class``, so a method in
the user's own package is sampled, checked, exported and retrained like a built-in
one. Everything else (sampling, measuring, storing, exporting, the CLI, the tests
parametrized over the registry) finds it by that name.

>>> from autoslim.methods import get_method, list_methods
>>> "trimming" in list_methods()
True
>>> sorted(get_method("trimming").search_space().params)[:2]
['alpha', 'apoz_examples']
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from autoslim.config import PruningConfig, TrainConfig
from autoslim.data import Data
from autoslim.errors import UsageError
from autoslim.fit import BUILTIN_FIT, UserEvaluate, UserFit
from autoslim.registry import Registry
from autoslim.selection import SizeTarget
from autoslim.space import SearchSpace, spaces_dir
from autoslim.train import Callback, evaluate

if TYPE_CHECKING:
    from autoslim.checkpoint import Checkpointer


@dataclass
class TrialContext:
    """What a method is handed besides the model: the data, the training budget and the callbacks.

    :meth:`train` is how a method trains: it numbers epochs across phases, keeps
    the history, and calls ``callbacks`` (the early-stopping rung check, the
    progress printer) after every epoch. Each phase runs one fit of the protocol
    in :mod:`autoslim.fit`: the user's ``fit`` (:class:`autoslim.fit.UserFit`)
    where one is given, else autoslim's loop (:data:`autoslim.fit.BUILTIN_FIT`); a user ``evaluate``
    (:class:`autoslim.fit.UserEvaluate`) replaces top-1 accuracy in
    :meth:`evaluate` and in the epoch records. With a ``checkpointer``
    (:class:`autoslim.checkpoint.Checkpointer`) every phase is checkpointed
    after each epoch where the fit is resumable (takes ``resume``: autoslim's
    loop does), else at its end, and a resumed trial replays the phases it had finished.
    """

    data: Data
    train_config: TrainConfig
    seed: int = 0
    callbacks: Sequence[Callback] = ()
    log: Callable[[str], None] = lambda msg: None
    history: list[dict] = field(default_factory=list)
    checkpointer: Checkpointer | None = None
    fit: UserFit | None = None
    evaluator: UserEvaluate | None = None
    #: The study's rules for what a structured method may remove (:mod:`autoslim.selection`).
    pruning: PruningConfig = field(default_factory=PruningConfig)
    #: A size (parameters or FLOPs) a structured method removes channels down to, in its own importance order,
    #: instead of by its threshold rule (:func:`autoslim.selection.select_to`); None: the method's own rule.
    target: SizeTarget | None = None
    #: Puts the trained network a method starts from into a model and says how it was obtained (a shared base,
    #: the user's weights: :class:`autoslim.basenet.BaseNetworks`); None: :meth:`pretrained` trains it here.
    base: Callable[[nn.Module], dict] | None = None
    #: How :meth:`pretrained` obtained the network (``base``'s answer); empty until then, or when trained here.
    base_info: dict = field(default_factory=dict)
    #: Epochs the shared base trained before this trial: they count in the seeds of its phases.
    base_epochs: int = field(default=0, init=False)

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def pretrained(self, model: nn.Module) -> None:
        """Make ``model`` the trained network a method compresses: :attr:`base`'s weights where one is given
        (nothing trained here; a shared base's epochs still count in the seeds of the later phases, so they
        train as they would after the same base trained here), else a phase ``train`` of ``train_config``."""
        if self.base is None:
            self.train(model, phase="train")
            return
        self.base_info = self.base(model)
        self.base_epochs = self.base_info.get("epochs", 0)

    def train(self, model: nn.Module, *, epochs: int | None = None, phase: str = "train", lr_scale: float = 1.0,
              callbacks: Sequence[Callback] = (), param_groups=None,
              extra_optimizers: Sequence[torch.optim.Optimizer] = (), config: TrainConfig | None = None) -> list[dict]:
        """Train ``model`` for one phase; records are tagged with ``phase`` and appended to :attr:`history`."""
        config = config or self.train_config
        epochs = config.epochs if epochs is None else epochs
        if epochs <= 0:
            return []
        fit = self.fit or BUILTIN_FIT
        run = functools.partial(fit, model, data=self.data, evaluate=self.evaluator or self._top1, config=config,
                                epochs=epochs, seed=self.seed + self.base_epochs + self.epochs_done,
                                lr_scale=lr_scale, callbacks=[*callbacks, *self.callbacks], param_groups=param_groups,
                                extra_optimizers=extra_optimizers, epoch_offset=self.epochs_done, phase=phase)
        records = run() if self.checkpointer is None else self.checkpointer.phase(
            run, model=model, name=phase, extra_optimizers=extra_optimizers, resumable=fit.resumable)
        self.history.extend(records)
        return records

    def evaluate(self, model: nn.Module, split: str = "val") -> float:
        """The user's ``evaluate`` on ``split`` ("val" or "test") where given, else top-1 accuracy."""
        if self.evaluator is not None:
            return self.evaluator(model, split)
        return evaluate(model, getattr(self.data, split))

    def _top1(self, model: nn.Module) -> float:
        return evaluate(model, self.data.val)

    def examples(self, n: int) -> torch.Tensor:
        """The first ``n`` validation inputs (surgery traces the model with them; methods measure changes on them)."""
        return self.data.examples(n)


@dataclass
class CompressionResult:
    """What a method returns: the compressed model and what it saw along the way.

    ``sparse`` marks unstructured sparsity (the parameter objective is then the
    non-zero count); ``size_bytes`` is the size of the method's own saved
    encoding where it differs from a dense ``state_dict``; ``info`` holds
    method-specific measurements (JSON-serialisable)."""

    model: nn.Module
    sparse: bool = False
    size_bytes: int | None = None
    info: dict = field(default_factory=dict)


class Method(ABC):
    """A compression method. Subclasses set :attr:`name` and implement :meth:`compress` (and :meth:`check`).

    A method that *is* an architecture (ThriftyNet) sets ``builds_model = True``
    and implements :meth:`build_model`; the study's model is then ignored. A
    method that removes channels sets ``structured = True``: it decides what
    survives through :func:`autoslim.selection.select`, so it honours the
    study's ``pruning:`` rules (``ignore``, ``round_to``), which its
    :meth:`check` receives and :attr:`TrialContext.pruning` holds.
    """

    name: ClassVar[str]
    builds_model: ClassVar[bool] = False
    structured: ClassVar[bool] = False
    #: Whether the method trains for ``train.epochs`` (with its regularizer) before it removes anything: the
    #: default early-stopping rungs lie after them (:func:`autoslim.search.halving.rungs_for`).
    trains_before_removal: ClassVar[bool] = False
    #: The knobs :meth:`check` reads: at study start each of their searched choices is checked on its own.
    check_params: ClassVar[tuple[str, ...]] = ()
    #: The knobs that decide the network's size under the method's own rule (a threshold, a keep ratio, a
    #: parameter budget): not sampled in a trial whose removal is ``target`` (its sampled size decides instead);
    #: the knobs of how the network gets there (strengths, rounds, epochs) stay searched.
    size_knobs: ClassVar[tuple[str, ...]] = ()
    #: The measures ("params", "flops") of a size target (:attr:`TrialContext.target`) :meth:`compress` reaches;
    #: empty: none, its trials run by its own rule whatever the study's ``target.removal`` (said once at start).
    target_measures: ClassVar[tuple[str, ...]] = ()
    #: The search space: None for the YAML file ``<name>.yaml`` beside the class's module (autoslim's own
    #: ``search_spaces/<name>.yaml`` for a built-in method), a YAML path relative to the module's folder, or
    #: the file's content as a mapping (``{"summary": ..., "params": {...}, "paper_default": {...}}``).
    space: ClassVar[str | Mapping | None] = None

    @classmethod
    def search_space(cls) -> SearchSpace:
        """The hyperparameters :attr:`space` declares (a file is read once per process), named after
        :attr:`name`; a UsageError line if there are none or they are malformed."""
        if isinstance(cls.space, Mapping):
            space = SearchSpace.from_dict(dict(cls.space), where=f"{cls.__module__}.{cls.__qualname__}.space")
        else:
            try:
                path = Path(inspect.getfile(cls)).parent / (cls.space or f"{cls.name}.yaml")
            except (TypeError, OSError):  # a class defined in a notebook or an interactive session
                raise UsageError(f"method {cls.name!r} declares no search space and its module has no file; "
                                 "accepted: a class attribute space (a mapping of its knobs)") from None
            if cls.space is None and not path.is_file() and cls.__module__.startswith("autoslim.methods."):
                path = spaces_dir() / f"{cls.name}.yaml"
            if not path.is_file():
                raise UsageError(f"method {cls.name!r} declares no search space: {path} does not exist; accepted: "
                                 f"{cls.name}.yaml beside its module, or a class attribute space (a YAML path "
                                 "relative to its module, or a mapping)")
            space = SearchSpace.read(path, method=cls.name)
        return dataclasses.replace(space, method=cls.name)

    def with_target(self, params: Mapping[str, Any], target: SizeTarget) -> dict:
        """``params`` of a trial given ``target`` (one of :attr:`target_measures`): unchanged by default; a method
        whose knob is its size sets it (ThriftyNet's ``budget``), so the trial's config records what ran."""
        return dict(params)

    def starts_from_base(self, params: Mapping[str, Any]) -> bool:
        """Whether, with ``params``, :meth:`compress` starts from a trained network (:meth:`TrialContext.pretrained`:
        the study's base, or a phase ``train`` where each trial trains its own). The default: where its knob
        ``start`` is ``base`` (l1/l2 and SSS: their regularized training then fine-tunes the trained network;
        their papers train from scratch, ``start: scratch``)."""
        return params.get("start") == "base"

    def build_model(self, params: Mapping[str, Any], *, in_shape, num_classes: int) -> nn.Module:
        raise NotImplementedError(f"method {self.name!r} compresses a given model; it does not build one")

    def check(self, model: nn.Module, *, example_input: torch.Tensor, params: Mapping[str, Any],
              pruning: PruningConfig | None = None) -> None:
        """Refuse, before any training, a model this method cannot compress with ``params``.

        Raises :class:`~autoslim.errors.UsageError`, one line naming the layer
        or op. :func:`autoslim.trial.run_trial` calls it on the
        untrained model with a trial's knobs; :func:`autoslim.study.optimize`
        once per method before anything is stored, with the knobs the study
        file pins (and each choice of the searched knobs in
        :attr:`check_params`), the others at their defaults. ``params`` is
        complete, as in :meth:`compress`. A ``structured`` method is also given
        the study's ``pruning`` rules (an ``ignore`` pattern that matches no
        layer is refused). The default accepts every model.
        """

    @abstractmethod
    def compress(self, model: nn.Module, ctx: TrialContext, params: Mapping[str, Any]) -> CompressionResult:
        """Train and compress ``model`` with hyperparameters ``params`` (every knob of the method's search
        space, :func:`autoslim.trial.check_trial_config` fills the ones a config leaves out); return the
        smaller model."""


CHANGE_IMAGES = 256  # validation images on which a method measures how much a removal changed the outputs


def border_rule(params: Mapping[str, Any], ctx: TrialContext) -> str:
    """What a method that folds removed channels' constants (l1l2, SSS) does with one whose non-zero constant a
    zero-padded conv reads (no bias reproduces it in the border windows), by its knob ``border``: ``exact`` keeps
    it (the removal changes nothing), ``fold`` removes it and folds the constant all the same (exact inside the
    image; the change is measured and logged); ``auto``, the default, is ``exact`` under the method's own rule
    and ``fold`` under a size target or cap (:attr:`TrialContext.target`), which such kept channels can put out
    of reach (LeNet-5's and ResNet's convolutions are zero-padded).

    >>> ctx = TrialContext(data=None, train_config=None)
    >>> border_rule({"border": "auto"}, ctx), border_rule({"border": "fold"}, ctx)
    ('exact', 'fold')
    """
    border = params.get("border", "auto")
    if border == "auto":
        return "exact" if ctx.target is None else "fold"
    return border


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """``model``'s outputs on ``x`` in eval mode (its training flag is restored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def relative_change(after: torch.Tensor, before: torch.Tensor) -> float:
    """``||after - before|| / ||before||`` to 3 significant digits (0 when both are 0).

    >>> relative_change(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0]))
    0.236
    """
    scale, diff = before.norm().item(), (after - before).norm().item()
    return float(f"{diff / scale:.3g}") if scale else float(diff > 0)


def _check_method_class(obj: Any, where: str) -> None:
    """A method from an entry point or an import string: a concrete Method subclass with a name and a valid
    search space."""
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise UsageError(f"{where}: expected a subclass of autoslim.Method, got {obj!r}")
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        raise UsageError(f"{where}: {obj.__qualname__} has no name; set the class attribute name = '...'")
    if inspect.isabstract(obj):
        raise UsageError(f"{where}: {obj.__qualname__} does not implement {', '.join(sorted(obj.__abstractmethods__))}")
    try:
        obj.search_space()
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None


METHODS: Registry[type[Method]] = Registry("method", field="method", group="autoslim.methods",
                                           check=_check_method_class)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a :class:`Method` subclass under ``cls.name``."""
    return METHODS.register(cls.name)(cls)


def get_method(name: str) -> Method:
    """A new instance of the method registered as ``name``."""
    return METHODS.get(name)()


def list_methods() -> list[str]:
    """Every registered and installed (entry-point) method name, sorted."""
    return METHODS.names()


def describe_method(name: str) -> dict:
    """Method ``name`` (registered, installed or an import string) as plain data: its summary, where it comes
    from, its knobs (:meth:`autoslim.space.SearchSpace.describe`), those that decide its size
    (:attr:`Method.size_knobs`) and the size targets it reaches (:attr:`Method.target_measures`); for
    ``autoslim methods``.

    >>> info = describe_method("trimming")
    >>> info["origin"], info["knobs"][0]["name"], info["builds_model"]
    ('built-in', 'rounds', False)
    """
    cls = METHODS.get(name, field="methods")
    space = cls.search_space()
    return {"name": name, "origin": METHODS.origin(name), "summary": space.summary,
            "builds_model": cls.builds_model, "knobs": space.describe(), "paper_default": space.paper_default,
            "size_knobs": list(cls.size_knobs), "target_measures": list(cls.target_measures)}
