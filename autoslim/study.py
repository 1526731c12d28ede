"""Creating, resuming and opening studies.

>>> from autoslim.config import StudyConfig
>>> cfg = StudyConfig.from_dict({"name": "doc", "n_trials": 1, "train": {"epochs": 1}, "warm_start": False,
...                              "data": {"name": "digits", "train_subset": 300}, "model": "lenet300_100",
...                              "methods": {"trimming": {"rounds": 1, "retrain_epochs": 1}}})
>>> study = optimize(cfg, storage="sqlite:///:memory:", log=lambda s: None)
>>> len(study.trials)
1
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping

import optuna
from optuna.trial import TrialState

from autoslim.basenet import check_user_weights
from autoslim.config import StudyConfig, artifact_location, budget, check_study_name, load_study
from autoslim.data import DATASETS, Data, load_data_subsets
from autoslim.distributed import run_worker, worker_index
from autoslim.errors import UsageError
from autoslim.fit import resolve_loop
from autoslim.measure import measure
from autoslim.methods import METHODS, get_method
from autoslim.models import MODELS, create_model
from autoslim.search.objective import Objective
from autoslim.selection import SizeTarget
from autoslim.recover import enqueue, top_up
from autoslim.space import SearchSpace
from autoslim.storage import get_storage, grpc_address, open_artifact_store, redact, storage_file, study_lock
from autoslim.trial import CHECK_EXAMPLES, check_method, structured_methods
from autoslim.train import resolve_device

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SET_UP_WAIT = 120  # seconds a worker waits, through a gRPC proxy, for the study's creator to set it up


def make_sampler(cfg: StudyConfig, *, worker: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler; worker ``k`` of a study shared by several gets seed ``seed + k``.

    TPE defaults to ``multivariate=True, group=True``: every autoslim space is conditional on
    ``method``, and grouped multivariate TPE models each method's knobs jointly, on the trials that
    sampled them. Optuna's own default for multi-objective studies samples every parameter on its
    own. ``sampler.options`` overrides either (``multivariate: false`` alone also turns grouping off)."""
    seed = (cfg.sampler.seed if cfg.sampler.seed is not None else cfg.seed) + worker
    cls = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
           "gp": optuna.samplers.GPSampler, "random": optuna.samplers.RandomSampler}[cfg.sampler.name]
    options = dict(cfg.sampler.options)
    if cfg.sampler.name == "tpe":
        options.setdefault("multivariate", True)
        options.setdefault("group", bool(options["multivariate"]))  # Optuna refuses group without multivariate
    try:
        with warnings.catch_warnings():  # group is experimental in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(seed=seed, **options)
    except (TypeError, ValueError) as e:
        raise UsageError(f"sampler.options: {' '.join(str(e).split())}") from None


def make_reference_point(cfg: StudyConfig, *, in_shape, num_classes: int, device="cpu") -> dict[str, float]:
    """The hypervolume reference point: the study file's values, else the uncompressed network's (its latency
    measured as the trials' is, on ``device`` where ``latency.device`` is ``study``)."""

    base = measure(create_model(cfg.model, in_shape=in_shape, num_classes=num_classes, adapt=cfg.model_adapt,
                                **cfg.model_kwargs),
                   in_shape=in_shape, latency_config=cfg.latency, device=device)
    ref = cfg.reference_point
    point = {"accuracy": ref.accuracy, "params": ref.params or base.params, "flops": ref.flops or base.flops,
             "latency": ref.latency or base.latency_ms}
    return {name: float(point[name]) for name in cfg.objectives}


def paper_defaults(spaces, *, size_budget: tuple[str, int] | None = None,
                   log: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Each method's published configuration as the Optuna parameters of a trial to enqueue.

    A value the study file pinned wins; a published value outside what the study searches (a range the study
    file narrowed, or a choice that cannot act on the model, taken out by :func:`check_methods`: SSS's
    ``level: block`` on a network without residual branches) is replaced by that range's default, said in one
    line. Under a ``size_budget`` (:func:`autoslim.config.budget`) a knob that is the method's size is mapped onto
    it (:meth:`autoslim.methods.Method.with_target`: ThriftyNet's ``budget`` becomes at most the budget); the
    trial then runs the method's own rule capped at the budget (:meth:`autoslim.search.objective.Objective.target`).

    >>> from autoslim.space import SearchSpace
    >>> space = SearchSpace.load("sss").narrow({"level": {"choices": ["channel"]}}, where="methods.sss")
    >>> paper_defaults({"sss": space}, log=print)[0]["sss.level"]
    warm start: sss's published level: block is outside what the study searches; it runs level: channel
    'channel'
    """
    trials = []
    for method, space in spaces.items():
        if not space.paper_default:
            continue
        values, replaced = {}, []
        for name, value in space.paper_default.items():
            try:
                values[name] = space.params[name].check(value, name)
            except UsageError:
                replaced.append(name)
        values = {**space.defaults(), **values}
        if replaced:
            log(f"warm start: {method}'s published {', '.join(f'{n}: {space.paper_default[n]}' for n in replaced)} "
                f"is outside what the study searches; it runs {', '.join(f'{n}: {values[n]}' for n in replaced)}")
        found = get_method(method)
        if size_budget is not None and size_budget[0] in found.target_measures:
            mapped = found.with_target(values, SizeTarget(size_budget[1], size_budget[0], cap=True))
            values.update({k: v for k, v in mapped.items() if _inside(space, k, v)})
        trials.append(space.optuna_params(values))
    return trials


def _inside(space: SearchSpace, name: str, value) -> bool:
    """Whether ``value`` lies in the range of knob ``name`` of ``space``."""
    try:
        space.params[name].check(value, name)
    except UsageError:
        return False
    return True


def check_study(cfg: StudyConfig) -> dict[str, SearchSpace]:
    """Check the names ``cfg`` gives against the registries (data set, model, methods: registered, installed
    entry points or import strings) and narrow each method's search space by its study-file overrides; return
    the narrowed spaces, by method as the study file names it. A UsageError line names
    the first field that is wrong; nothing has been written anywhere yet.

    >>> spaces = check_study(StudyConfig.from_dict({"methods": {"trimming": {"rounds": 2}}}))
    >>> spaces["trimming"].params["rounds"].pinned
    True
    """
    DATASETS.get(cfg.data.name)
    MODELS.get(cfg.model)
    for m in cfg.methods:
        own = {"fit", "evaluate"} & set(cfg.methods[m].train)
        resolve_loop(cfg.train_for(m), where=f"methods.{m}.train" if own else "train")
    for m in cfg.methods:
        cls = METHODS.get(m, field="methods")
        stray = [k for k in cls.size_knobs if k not in cls.search_space().params]
        if stray:
            raise UsageError(f"methods: {m!r} declares size_knobs {', '.join(map(repr, stray))} that its search "
                             f"space lacks; accepted: knobs of its space ({', '.join(cls.search_space().params)})")
    # named as the study file names the method (an import string too): the Optuna parameters are <name>.<knob>
    return {m: dataclasses.replace(METHODS.get(m, field="methods").search_space(), method=m).narrow(
                c.space, where=f"methods.{m}") for m, c in cfg.methods.items()}


def optimize(cfg: StudyConfig, *, n_trials: int | None = None, timeout: float | None = None,
             storage: str | None = None, study_name: str | None = None, artifact_store: str | None = None,
             strict_timeout: bool = False, log: Callable[[str], None] = print) -> optuna.Study:
    """Create or resume the study of ``cfg`` and run it until it holds ``n_trials`` finished trials.

    Everything the user gave is checked (names, ranges, data files, storage,
    and whether each method can compress the model: :func:`check_methods`)
    before anything is written to storage. Completed and pruned trials are
    never redone: a second call with the same arguments runs only the rest.
    Every completed trial uploads its artifacts (:mod:`autoslim.artifacts`) to
    ``artifact_store`` (a folder or ``s3://bucket/prefix``), by default the folder beside a
    file storage; trial checkpoints go there too. As in Optuna,
    ``timeout`` stops starting trials; with ``strict_timeout`` a trial still
    running then is also stopped at its next optimizer step (pruned, its
    partial results kept), so the wall time is the timeout plus at most one step.
    """
    n_trials = n_trials or cfg.n_trials
    timeout = timeout if timeout is not None else cfg.timeout
    artifact_store = artifact_location(artifact_store, base=Path.cwd(), field="--artifact-store") or cfg.artifact_store
    study_name = cfg.name if study_name is None else check_study_name(study_name, "--study-name")
    spaces = check_study(cfg)
    sampler = make_sampler(cfg)
    method_data = load_method_data(cfg, device=resolve_device(cfg.device))
    data = method_data[next(iter(cfg.methods))]
    spaces = check_methods(cfg, spaces, data, log=log)
    url = storage or cfg.storage or cfg.default_storage()
    open_artifact_store(url, location=artifact_store)  # an S3 bucket must answer before anything is written
    with study_lock(url):  # the storage's tables, and the workers' numbers, are made once
        storage_obj = get_storage(url)
        store = open_artifact_store(url, location=artifact_store, create=True)
        study = _create_or_load(storage_obj, cfg, study_name=study_name, sampler=sampler, spaces=spaces, data=data,
                                n_trials=n_trials, wait=SET_UP_WAIT if grpc_address(url) else 0, log=log)
        study.sampler = make_sampler(cfg, worker=worker_index(study, storage=storage_obj))
    done = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    remaining = n_trials - done
    log(f"study {study_name!r} in {redact(url)}: "
        f"{done} finished trial(s), running {max(0, remaining)} more on {cfg.data.name} "
        f"({_train_sizes(method_data)} / {len(data.val)} val / {len(data.test)} test), model {cfg.model}, "
        f"methods {', '.join(spaces)}")
    found = budget(cfg.constraints)
    own_rule = [m for m in spaces if found and found[0] not in get_method(m).target_measures]
    if own_rule and cfg.removal != "threshold":
        log(f"target: {', '.join(own_rule)} cannot remove down to a {found[0]} target; its trials run by its own "
            "rule (warm start included)")
    unused = [f"methods.{m}.{k}" for m in spaces if m not in own_rule
              for k in get_method(m).size_knobs if k in cfg.methods[m].space]
    if unused and cfg.removal == "target":
        log(f"target: {', '.join(unused)} decide(s) the size under the paper's rule only; with removal: target "
            "only the warm start uses them")
    unruled = [m for m in spaces if not get_method(m).structured]
    if cfg.pruning.active and unruled:
        log(f"pruning: ignore and round_to apply to {', '.join(m for m in spaces if m not in unruled)}; "
            f"{', '.join(unruled)} do(es) not remove channels and run(s) without them")
    if remaining > 0:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("optuna.study._optimize").setLevel(logging.ERROR)  # the Objective logs failures, one line
        if store is None and cfg.recovery.checkpoint:
            log("no --artifact-store (or artifact_store in the study file): trials are not checkpointed, so a trial "
                "retried after its worker died starts over")
        deadline = time.time() + timeout if strict_timeout and timeout is not None else None
        objective = Objective(cfg, data, spaces, method_data=method_data, log=log, artifact_store=store, deadline=deadline)
        recovery = cfg.recovery
        run_worker(study, objective, n_trials=n_trials, max_trials=remaining, timeout=timeout,
                   stale_after=recovery.grace_period or 2 * recovery.heartbeat_interval, max_retry=recovery.max_retry,
                   poll=min(5.0, recovery.heartbeat_interval), log=log)
    return study


def check_methods(cfg: StudyConfig, spaces: Mapping[str, SearchSpace], data: Data, *,
                  log: Callable[[str], None] = print) -> dict[str, SearchSpace]:
    """Each method checks the study's untrained model once (:meth:`autoslim.methods.Method.check`), built as
    the trials build it (a model that does not fit the data is refused here: :func:`autoslim.models.create_model`);
    return the spaces, a knob's choices that cannot act on the model left out where the study file left it open.

    A method that cannot compress it is refused in one UsageError line naming the layer or op. Of a searched knob
    the check reads (``Method.check_params``), the choices that cannot act on the model are taken out, with one
    line, when the study file does not set the knob (the method's own range, on whatever model); when it does
    (or when several such knobs are searched together), they are refused, naming the choices that can. Knobs the
    study file pins are checked at their value, the others at their defaults.
    The user's ``base.weights`` must load into the model (:func:`autoslim.basenet.check_user_weights`).

    >>> cfg = StudyConfig.from_dict({"model": "lenet5", "methods": {"sss": {}}, "data": {"name": "digits"}})
    >>> check_methods(cfg, check_study(cfg), load_method_data(cfg)["sss"])["sss"].params["level"].choices
    methods.sss.level: 'block', 'both' cannot act on model lenet5 (sss: no structure to scale at level 'block': LeNet5 has no residual branch x + f(x) (in a submodule, f ending in a conv, linear or norm layer)); searched: channel
    ('channel',)
    """
    if cfg.pruning.active and not any(get_method(name).structured for name in spaces):
        raise UsageError(f"pruning: none of the study's methods ({', '.join(spaces)}) removes channels, so ignore "
                         f"and round_to would do nothing; accepted with: {', '.join(structured_methods())}")
    # built even when every method builds its own: the reference point measures it once the study is stored
    model = create_model(cfg.model, in_shape=data.in_shape, num_classes=data.num_classes,
                         adapt=cfg.model_adapt, **cfg.model_kwargs).to(data.device)
    spaces = dict(spaces)
    for name, space in spaces.items():
        method = get_method(name)
        if method.builds_model:
            continue
        knobs = [k for k in method.check_params if not space.params[k].pinned]
        combos = [dict(zip(knobs, values))
                  for values in itertools.product(*(space.params[k].choices or (False, True) for k in knobs))]
        refused = {}
        for combo in combos:
            try:
                check_method(method, model, example_input=data.examples(CHECK_EXAMPLES),
                             params={**space.defaults(), **combo}, pruning=cfg.pruning)
            except UsageError as e:
                refused[", ".join(map(str, combo.values()))] = e
        if len(refused) == len(combos):
            raise next(iter(refused.values()))
        if not refused:
            continue
        ok = [c for c in combos if ", ".join(map(str, c.values())) not in refused]
        why = (f"{', '.join(map(repr, refused))} cannot act on model {cfg.model} ({next(iter(refused.values()))})")
        if len(knobs) == 1 and knobs[0] not in cfg.methods[name].space:
            (knob,) = knobs
            spaces[name] = space.narrow({knob: {"choices": [c[knob] for c in ok]}}, where=f"methods.{name}")
            log(f"methods.{name}.{knob}: {why}; searched: {', '.join(str(c[knob]) for c in ok)}")
            continue
        raise UsageError(f"methods.{name}.{'/'.join(knobs)}: {why}; narrow it to: "
                         f"{'; '.join(', '.join(map(str, c.values())) for c in ok)}")
    if cfg.base.weights is not None:
        check_user_weights(model, cfg.base.weights)
    return spaces


def load_method_data(cfg: StudyConfig, *, device: str = "cpu") -> dict[str, Data]:
    """Each method's data (the study's, with ``methods.<name>.data``), reading the files once.

    All of them share the validation and test splits; a method's training
    images are the first ones of the largest set any method trains on.

    >>> cfg = StudyConfig.from_dict({"data": {"name": "digits", "train_subset": 200},
    ...                              "methods": {"trimming": {}, "thriftynet": {"data": {"train_subset": 0.5}}}})
    >>> {m: len(d.train) for m, d in load_method_data(cfg).items()}
    {'trimming': 200, 'thriftynet': 611}
    """
    subsets = [cfg.data_for(m).train_subset for m in cfg.methods]
    return dict(zip(cfg.methods, load_data_subsets(cfg.data, subsets, device=device)))


def _train_sizes(method_data: dict[str, Data]) -> str:
    """'20000 train', or '20000 train (thriftynet 51000)' where a method trains on more or fewer images."""
    (first, data), *rest = method_data.items()
    others = [f"{m} {len(d.train)}" for m, d in rest if len(d.train) != len(data.train)]
    return f"{len(data.train)} train" + (f" ({', '.join(others)})" if others else "")


def _create_or_load(storage: optuna.storages.BaseStorage, cfg: StudyConfig, *, study_name: str,
                    sampler: optuna.samplers.BaseSampler, spaces, data, n_trials: int, wait: float,
                    log: Callable[[str], None] = print) -> optuna.Study:
    """Create the study and set it up (:func:`_set_up`) if this worker's ``create_new_study`` wins; else load it,
    once its creator has set it up (its metric names are set last; ``wait``: for how many seconds, through a
    proxy that no study lock covers), and check its objectives."""
    directions = [optuna.study.StudyDirection.MAXIMIZE if o == "accuracy" else optuna.study.StudyDirection.MINIMIZE
                  for o in cfg.objectives]
    try:
        storage.create_new_study(directions, study_name)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    if created:
        _set_up(study, cfg, spaces, data, n_trials=n_trials, log=log)
    deadline = time.monotonic() + wait
    while study.metric_names is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if study.metric_names is None:
        raise UsageError(f"--study-name: study {study_name!r} exists but was never set up by autoslim (its creator "
                         f"died, or another program made it); delete it or choose another --study-name")
    if list(study.metric_names) != cfg.objectives:
        raise UsageError(f"third_objective: study {study.study_name!r} was created with objectives "
                         f"{', '.join(study.metric_names)}; a study's objectives cannot change")
    return study


def _set_up(study: optuna.Study, cfg: StudyConfig, spaces, data, *, n_trials: int,
            log: Callable[[str], None] = print) -> None:
    """Store the config and reference point, queue the warm starts and the other slots' trials, then name the
    metrics: the sign, for the workers that found the study made, that it is set up."""
    study.set_user_attr("autoslim_config", json.loads(json.dumps(cfg.to_dict(), default=str)))
    study.set_user_attr("reference_point", make_reference_point(cfg, in_shape=data.in_shape,
                                                                num_classes=data.num_classes, device=data.device))
    if cfg.warm_start:
        warm = paper_defaults(spaces, size_budget=budget(cfg.constraints), log=log)
        for slot, params in enumerate(warm[:n_trials]):
            enqueue(study, slot=slot, params=params, user_attrs={"warm_start": "paper default"})
    top_up(study, n_trials)
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and what optuna-dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(cfg.objectives)


def study_locations(target: str, *, storage: str | None = None,
                    artifact_store: str | None = None) -> tuple[str, str | None]:
    """The storage URL and artifact folder of a study file or storage URL ``target``.

    The flags (``--storage``, ``--artifact-store``) win over a study file's fields, as
    :func:`autoslim.study.open_study` reads them; a None folder means the storage's
    default (:func:`autoslim.storage.default_artifact_dir`)."""
    if Path(target).suffix in (".yaml", ".yml"):
        cfg = load_study(target)
        return storage or cfg.storage or cfg.default_storage(), artifact_location(
            artifact_store, base=Path.cwd(), field="--artifact-store") or cfg.artifact_store
    return storage or target, artifact_location(artifact_store, base=Path.cwd(), field="--artifact-store")


def storage_url(target: str, *, storage: str | None = None) -> str:
    """The storage URL of a study file or storage URL ``target``."""
    return study_locations(target, storage=storage)[0]


def open_study(target: str, *, study_name: str | None = None, storage: str | None = None) -> optuna.Study:
    """Open an existing study from a study file or a storage URL; a UsageError line if it is not there."""
    if Path(target).suffix in (".yaml", ".yml"):
        cfg = load_study(target)
        url, name = storage or cfg.storage or cfg.default_storage(), study_name or cfg.name
        local = storage_file(url)
        if local is not None and not local.is_file():  # opening it would create it
            raise UsageError(f"study: {target} has not been run yet (no {local}); run `autoslim optimize {target}"
                             f"{' --storage ' + storage if storage else ''}` first")
    else:
        url, name = storage or target, study_name
        local = storage_file(url)
        if local is not None and not local.is_file():
            raise UsageError(f"study: no {'database' if url.startswith('sqlite') else 'journal file'} at {local}")
    storage_obj = get_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage_obj)]
    if name is None:
        if len(names) != 1:
            raise UsageError(f"--study-name: {redact(url)} holds {len(names)} studies; name one of: {_names(names)}")
        name = names[0]
    if name not in names:
        raise UsageError(f"--study-name: no study {name!r} in {redact(url)}; accepted: {_names(names)}")
    return optuna.load_study(study_name=name, storage=storage_obj)


def _names(names: list[str]) -> str:
    """Study names for a message, quoted (a name made elsewhere may hold any character)."""
    return ", ".join(map(repr, names)) or "(none)"
