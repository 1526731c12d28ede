"""Compressed models that load anywhere: the model file, TorchScript, ONNX, and ``autoslim export``/``train``.

The model file (``model.pt``) is a plain dict saved with :func:`torch.save`
that loads with ``torch.load(path, weights_only=True)``::

    {"format": "autoslim-model-1",
     "spec": {"model", "model_kwargs", "in_shape", "num_classes", "method", "method_params",
              "architecture": autoslim.surgery.architecture_spec(model)},
     "sparse": bool,
     "state_dict": {name: tensor}      # or, for sparse results, the bit-mask encoding of
                                       # autoslim.sparse.sparse_state_dict
    }

:func:`load_model` rebuilds the network from it: the registry model (or the
method's own architecture for methods that build one), reshaped by
:func:`autoslim.surgery.apply_architecture_spec`, then the weights.
``model.ts`` (TorchScript) and ``model.onnx`` need neither autoslim nor the
model's Python code. TorchScript and ONNX store every weight densely; only
``model.pt`` keeps a sparse result's sparse encoding.

``autoslim export`` takes a trial's compressed model from its uploaded
``model.pt`` artifact (:mod:`autoslim.artifacts`); a trial without one (a study
run without an artifact store) is retrained from its stored config with the
same seed, which gives a similar, not necessarily identical, model.

>>> import torch, tempfile
>>> from autoslim.config import TrialConfig
>>> from autoslim.models import create_model
>>> net = create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10)
>>> path = save_model(f"{tempfile.mkdtemp()}/model.pt", net, config=TrialConfig(method="trimming",
...                   model="lenet300_100"), in_shape=(1, 8, 8), num_classes=10)
>>> x = torch.randn(2, 1, 8, 8)
>>> torch.equal(load_model(path)(x), net.eval()(x))
True
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from autoslim.config import TrialConfig
from autoslim.data import Data, load_data
from autoslim.errors import UsageError, load_error
from autoslim.search.objective import EpochPrinter, TrialResult, build_model, run_trial
from autoslim.sparse import load_sparse_state_dict, sparse_state_dict
from autoslim.surgery import apply_architecture_spec, architecture_spec
from autoslim.train import resolve_device
from autoslim.trial import check_trial_config, load_trial_config

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore

FORMAT = "autoslim-model-1"
FILES = ("config.yaml", "model.pt", "model.ts", "model.onnx")


def save_model(path: str | Path, model: nn.Module, *, config: TrialConfig, in_shape: Sequence[int],
               num_classes: int, sparse: bool = False) -> Path:
    """Write ``model`` (weights + architecture spec) to ``path``; sparse models keep their sparse encoding."""
    spec = {"model": config.model, "model_kwargs": dict(config.model_kwargs), "in_shape": [int(s) for s in in_shape],
            "num_classes": int(num_classes), "method": config.method, "method_params": dict(config.params),
            "architecture": architecture_spec(model)}
    state = sparse_state_dict(model) if sparse else {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": FORMAT, "spec": spec, "sparse": sparse, "state_dict": state}, path)
    return Path(path)


# The fields of a model file and of its spec, with their types.
FIELDS = {"spec": dict, "sparse": bool, "state_dict": dict}
SPEC_FIELDS = {"model": str, "model_kwargs": dict, "in_shape": list, "num_classes": int, "method": str,
               "method_params": dict, "architecture": dict}


def read_model_file(path: str | Path, *, name: str | None = None) -> dict[str, Any]:
    """The dict in a model file, checked to hold every field of one; a UsageError line naming the file (or
    ``name``, e.g. the trial artifact it came from) if it does not."""
    what = name or str(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"model file: {what} does not exist") from None
    except Exception as e:
        raise UsageError(f"model file: {what} cannot be read: {load_error(e)}") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise UsageError(f"model file: {what} is not an autoslim model file (expected format {FORMAT!r})")
    _check_fields(saved, FIELDS, what=what)
    _check_fields(saved["spec"], SPEC_FIELDS, what=what, prefix="spec.")
    return saved


def _check_fields(d: dict, fields: dict[str, type], *, what: str, prefix: str = "") -> None:
    for key, tp in fields.items():
        value = d.get(key)
        if not isinstance(value, tp) or (isinstance(value, bool) and tp is not bool):
            raise UsageError(f"model file: {what}: {prefix}{key} is missing or not a {tp.__name__}; "
                             "accepted: a file written by autoslim (save_model, autoslim export or train)")


def load_model(path: str | Path, *, name: str | None = None) -> nn.Module:
    """Rebuild the compressed model saved in ``path`` by :func:`save_model` (on the CPU, in eval mode).

    A file that is not one (a wrong field, an architecture the model cannot take, weights of other
    shapes) is a UsageError line naming the file, or ``name`` where given.

    >>> model = load_model("exports/trial_3/model.pt")  # doctest: +SKIP
    """
    what = name or str(path)
    saved = read_model_file(path, name=name)
    spec = saved["spec"]
    try:
        config, _ = check_trial_config(TrialConfig(method=spec["method"], params=spec["method_params"],
                                                   model=spec["model"], model_kwargs=spec["model_kwargs"]))
    except UsageError as e:  # the spec's field of a trial config's "params" is "method_params"
        raise UsageError(f"model file: {what}: spec.{'method_' if str(e).startswith('params') else ''}{e}") from None
    model = _load_step(what, "its network cannot be built", lambda: build_model(
        config, in_shape=tuple(spec["in_shape"]), num_classes=spec["num_classes"]))
    model = _load_step(what, "its architecture does not fit its model",
                       lambda: apply_architecture_spec(model, spec["architecture"]))
    _load_step(what, "its weights do not fit its architecture", lambda: _load_weights(model, saved))
    return model.eval()


def _load_weights(model: nn.Module, saved: dict) -> None:
    if saved["sparse"]:
        load_sparse_state_dict(model, saved["state_dict"])
    else:
        model.load_state_dict(saved["state_dict"])


def _load_step(what: str, problem: str, step: Callable[[], Any]) -> Any:
    """``step()``; any error a malformed model file causes in it becomes a UsageError line."""
    try:
        return step()
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = "; ".join(lines[1:4] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[:3])
        raise UsageError(f"model file: {what}: {problem}: {type(e).__name__}: {detail}".rstrip(": ")) from None


def to_torchscript(model: nn.Module, path: str | Path, *, in_shape: Sequence[int]) -> Path:
    """Trace ``model`` to TorchScript at ``path`` (``torch.jit.load`` needs no autoslim)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), torch.randn(2, *in_shape))
        torch.jit.save(traced, str(path))
    return Path(path)


def to_onnx(model: nn.Module, path: str | Path, *, in_shape: Sequence[int]) -> Path:
    """Export ``model`` to ONNX (input ``input``, output ``logits``, any batch size) and check it with onnxruntime."""
    import onnxruntime

    x = torch.randn(3, *in_shape)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x[:1],), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        expected = model(x).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    if not np.allclose(got, expected, rtol=1e-3, atol=1e-4):
        raise RuntimeError(f"export: onnxruntime disagrees with PyTorch on {path} "
                           f"(max difference {np.abs(got - expected).max():.3g})")
    return Path(path)


def write_model_formats(model_file: Path, *, config: TrialConfig, name: str | None = None) -> list[Path]:
    """Beside ``model_file`` (a :func:`save_model` file; ``name`` names it in errors), write config.yaml,
    model.ts and model.onnx."""
    model, spec = load_model(model_file, name=name), read_model_file(model_file, name=name)["spec"]
    folder = model_file.parent
    (folder / "config.yaml").write_text(config.to_yaml())
    return [folder / "config.yaml", model_file, to_torchscript(model, folder / "model.ts", in_shape=spec["in_shape"]),
            to_onnx(model, folder / "model.onnx", in_shape=spec["in_shape"])]


def _objective(study: optuna.Study, trial: FrozenTrial, name: str) -> float:
    names = list(study.metric_names or ["accuracy", "params"])
    return trial.values[names.index(name)]


def select_trials(study: optuna.Study, *, trial: int | None = None, pareto: bool = False,
                  best_under_params: int | None = None) -> list[FrozenTrial]:
    """The completed trials to export: trial number ``trial``, the Pareto front, or the most accurate
    trial with at most ``best_under_params`` parameters; a UsageError line if there is none.

    >>> select_trials(study, best_under_params=10_000)  # doctest: +SKIP
    [FrozenTrial(number=4, ...)]
    """
    from autoslim.search.pareto import is_feasible, pareto_front

    if sum((trial is not None, pareto, best_under_params is not None)) != 1:
        raise UsageError("export: choose one of --trial N, --pareto, --best-under-params K")
    trials = study.get_trials(deepcopy=False)
    if trial is not None:
        found = next((t for t in trials if t.number == trial), None)
        if found is None:
            raise UsageError(f"--trial: study {study.study_name!r} has no trial {trial}; "
                             f"trials: {'0 to ' + str(len(trials) - 1) if trials else '(none)'}")
        if found.state != TrialState.COMPLETE:
            state = {TrialState.RUNNING: "still running", TrialState.FAIL: "failed"}.get(found.state,
                                                                                     found.state.name.lower())
            raise UsageError(f"--trial: trial {trial} is {state}; only completed trials can be exported")
        chosen = [found]
    elif pareto:
        chosen = pareto_front(study)
    else:
        done = [t for t in trials if t.state == TrialState.COMPLETE and is_feasible(t)]
        fits = [t for t in done if _objective(study, t, "params") <= best_under_params]
        if not fits:
            smallest = f"; the smallest has {int(min(_objective(study, t, 'params') for t in done)):,}" if done else ""
            raise UsageError(f"--best-under-params: no completed trial has at most {best_under_params:,} "
                             f"parameters{smallest}")
        chosen = [max(fits, key=lambda t: (_objective(study, t, "accuracy"), -_objective(study, t, "params")))]
    if not chosen:
        raise UsageError(f"--pareto: study {study.study_name!r} has no completed trials")
    for t in chosen:
        if "config" not in t.user_attrs:
            raise UsageError(f"trial {t.number} has no stored config; was the study made by autoslim?")
    return chosen


def export_trial(study: optuna.Study, trial: FrozenTrial, *, out: str | Path, artifact_store: ArtifactStore | None,
                 retrain: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write ``out/trial_<N>/`` with config.yaml, model.pt, model.ts and model.onnx; return the folder.

    The model comes from the trial's ``model.pt`` artifact in ``artifact_store``;
    without one (or with ``retrain``) the trial is retrained from its config.
    The folder appears complete or not at all.

    >>> export_trial(study, study.best_trials[0], out="exports", artifact_store=store)  # doctest: +SKIP
    PosixPath('exports/trial_3')
    """
    from autoslim.artifacts import trial_artifacts

    config = TrialConfig.from_dict(trial.user_attrs["config"])
    meta = None if retrain else trial_artifacts(study, trial).get("model.pt")
    if meta is not None and artifact_store is None:
        raise UsageError(f"trial {trial.number}: its model artifact is in an artifact store this storage has no "
                         "default folder for; pass --artifact-dir, or --retrain to rebuild it")
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / f"trial_{trial.number}"
        stage.mkdir()
        model_file = stage / "model.pt"
        if meta is not None:
            try:
                optuna.artifacts.download_artifact(artifact_store=artifact_store, artifact_id=meta.artifact_id,
                                                   file_path=str(model_file))
            except optuna.artifacts.exceptions.ArtifactNotFound:
                raise UsageError(f"trial {trial.number}: its model artifact {meta.artifact_id} is not in the "
                                 "artifact store; pass --artifact-dir, or --retrain to rebuild it") from None
            source = "its model artifact"
        else:
            why = "--retrain" if retrain else "no model artifact"
            log(f"[trial {trial.number}] {why}: retraining it from its config (seed {config.seed})")
            result, data = retrain_config(config, log=log)
            save_model(model_file, result.model, config=config, in_shape=data.in_shape,
                       num_classes=data.num_classes, sparse=result.sparse)
            stored = trial.user_attrs.get("nonzeros" if result.sparse else "params")
            if result.params != stored:
                log(f"[trial {trial.number}] note: the retrained model has {result.params:,} parameters, "
                    f"the trial had {stored:,}")
            source = "retraining"
        write_model_formats(model_file, config=config,
                            name=f"the model.pt artifact {meta.artifact_id} of trial {trial.number}" if meta else None)
        dest = Path(out) / stage.name
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(stage), dest)
    log(f"trial {trial.number} -> {dest}/ ({', '.join(FILES)}; model from {source})")
    return dest


def retrain_config(config: TrialConfig, *, log: Callable[[str], None] = print) -> tuple[TrialResult, Data]:
    """Rebuild and retrain the network of ``config`` on its data, as the trial did (same seed)."""
    data = load_data(config.data, device=resolve_device(config.device))
    result = run_trial(config, data=data, callbacks=[EpochPrinter(log, "[train]")], log=lambda s: log(f"[train] {s}"))
    return result, data


def train_config_file(path: str | Path, *, out: str | Path | None = None,
                      log: Callable[[str], None] = print) -> TrialResult:
    """``autoslim train``: retrain an exported ``config.yaml``; with ``out``, write the model files there.

    The file is checked before anything runs (:func:`autoslim.trial.load_trial_config`): it must hold every section of a
    trial, and its method parameters must be the method's and in range. Parameters it leaves out take the
    search-space defaults (one log line; ``config.yaml`` in ``out`` holds them all).

    >>> result = train_config_file("exports/trial_3/config.yaml", out="retrained")  # doctest: +SKIP
    >>> result.val_accuracy, result.params  # doctest: +SKIP
    (0.94, 21330)
    """
    config = load_trial_config(path)
    result, data = retrain_config(config, log=log)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        model_file = save_model(Path(out) / "model.pt", result.model, config=result.config, in_shape=data.in_shape,
                                num_classes=data.num_classes, sparse=result.sparse)
        write_model_formats(model_file, config=result.config)  # with the parameters the file left out
    return result
