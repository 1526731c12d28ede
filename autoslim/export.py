"""``autoslim export`` and ``autoslim train``: a trial's compressed model as files that load anywhere.

``autoslim export`` writes ``OUT/trial_<N>/`` with ``config.yaml`` (the trial's
config, with what the model expects as input), ``model.pt``
(:mod:`autoslim.modelfile`), ``model.ts`` (TorchScript) and ``model.onnx``;
TorchScript and ONNX need neither autoslim nor the model's Python code, and
store every weight densely (only ``model.pt`` keeps a sparse result's sparse
encoding). The model comes from the trial's uploaded ``model.pt`` artifact
(:mod:`autoslim.artifacts`); a trial without one (a study run without an
artifact store), or ``--retrain``, is retrained from its stored config with the
same seed, which gives a similar, not necessarily identical, model.
``autoslim train CONFIG`` retrains an exported ``config.yaml``.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import optuna
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from autoslim.config import TrialConfig
from autoslim.data import Data, load_data
from autoslim.artifacts import trial_artifacts
from autoslim.errors import UsageError
from autoslim.measure import write_onnx
from autoslim.modelfile import load_model, read_model_file, save_model
from autoslim.search.pareto import is_feasible, pareto_front
from autoslim.train import resolve_device
from autoslim.trial import EpochPrinter, TrialResult, load_trial_config, run_trial

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore

FILES = ("config.yaml", "model.pt", "model.ts", "model.onnx")


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
    write_onnx(model, path, example=x[:1])
    with torch.no_grad():
        expected = model(x).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    if not np.allclose(got, expected, rtol=1e-3, atol=1e-4):
        raise RuntimeError(f"export: onnxruntime disagrees with PyTorch on {path} "
                           f"(max difference {np.abs(got - expected).max():.3g})")
    return Path(path)


def write_model_formats(model_file: Path, *, config: TrialConfig, name: str | None = None) -> list[Path]:
    """Beside ``model_file`` (a :func:`save_model` file; ``name`` names it in errors), write config.yaml,
    model.ts and model.onnx. config.yaml is the trial's config; where the model file says what the model
    expects, an ``input:`` section follows (shape, mean, std, classes), which ``autoslim train`` reads as
    information (the data section decides)."""
    model, spec = load_model(model_file, name=name), read_model_file(model_file, name=name)["spec"]
    folder = model_file.parent
    expects = yaml.safe_dump({"input": spec["input"]}, sort_keys=False, default_flow_style=None) if "input" in spec else ""
    (folder / "config.yaml").write_text(config.to_yaml() + expects)
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
    config = TrialConfig.from_dict(trial.user_attrs["config"])
    meta = None if retrain else trial_artifacts(study, trial).get("model.pt")
    if meta is not None and artifact_store is None:
        raise UsageError(f"trial {trial.number}: its model artifact is in an artifact store this storage has no "
                         "default folder for; pass --artifact-store, or --retrain to rebuild it")
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
                                 "artifact store; pass --artifact-store, or --retrain to rebuild it") from None
            source = "its model artifact"
        else:
            why = "--retrain" if retrain else "no model artifact"
            log(f"[trial {trial.number}] {why}: retraining it from its config (seed {config.seed})")
            result, data = retrain_config(config, log=log)
            save_model(model_file, result.model, config=config, in_shape=data.in_shape,
                       num_classes=data.num_classes, sparse=result.sparse, input_spec=result.input_spec)
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
                                num_classes=data.num_classes, sparse=result.sparse,
                                input_spec=result.input_spec)
        write_model_formats(model_file, config=result.config)  # with the parameters the file left out
    return result
