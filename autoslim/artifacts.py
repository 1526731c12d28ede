"""Per-trial artifacts: the compressed model, two charts and a note, uploaded through :mod:`optuna.artifacts`.

Every completed trial uploads ``model.pt`` (weights + architecture spec,
:func:`autoslim.modelfile.save_model`; sparse results keep their sparse encoding),
``widths.png`` (per-layer widths, or weight density for sparse results, before
and after compression), ``training.png`` (validation accuracy and training
loss per epoch, phases marked) and ``note.md`` (the summary, also saved as the
trial's optuna-dashboard note). The files go to the study's artifact store
(:func:`autoslim.storage.open_artifact_store`): by default a
:class:`~optuna.artifacts.FileSystemArtifactStore` in the folder beside a file
storage (``sqlite:///path/x.db`` -> ``path/x-artifacts/``, ``x.journal`` ->
``x-artifacts/``, :func:`autoslim.storage.default_artifact_dir`); ``artifact_store:``
in the study file or ``--artifact-store`` names another folder or an
``s3://bucket/prefix`` (Optuna's ``Boto3ArtifactStore``). Other storages keep no
artifacts without one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import optuna
from optuna.artifacts import ArtifactMeta
from optuna.trial import FrozenTrial

from autoslim.modelfile import save_model
from autoslim.trial import TrialResult

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore


def trial_artifacts(study: optuna.Study, trial: FrozenTrial) -> dict[str, ArtifactMeta]:
    """The artifacts uploaded by ``trial``, by file name.

    >>> sorted(trial_artifacts(study, study.trials[0]))  # doctest: +SKIP
    ['model.pt', 'note.md', 'training.png', 'widths.png']
    """
    metas = optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage)
    return {m.filename: m for m in metas}


def upload_trial_artifacts(trial: optuna.Trial, result: TrialResult, *, artifact_store: ArtifactStore,
                           in_shape: Sequence[int], num_classes: int) -> dict[str, str]:
    """Upload the model, the charts and the note of a finished trial; return artifact ids by file name.

    The note is also saved as the trial's optuna-dashboard note.

    >>> store = open_artifact_store("sqlite:///runs/x.db", create=True)  # doctest: +SKIP
    >>> upload_trial_artifacts(trial, result, artifact_store=store,  # doctest: +SKIP
    ...                        in_shape=(1, 8, 8), num_classes=10)
    {'model.pt': '3c5…', 'widths.png': '…', 'training.png': '…', 'note.md': '…'}
    """
    from optuna_dashboard import save_note


    note = trial_note(trial.number, result)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_model(folder / "model.pt", result.model, config=result.config, in_shape=in_shape,
                   num_classes=num_classes, sparse=result.sparse, input_spec=result.input_spec)
        plot_widths(result, folder / "widths.png", title=f"trial {trial.number}: {result.config.method}")
        plot_training(result.history, folder / "training.png", title=f"trial {trial.number}: {result.config.method}")
        (folder / "note.md").write_text(note)
        written = _Written(artifact_store)
        try:
            ids = {name: optuna.artifacts.upload_artifact(artifact_store=written, file_path=str(folder / name),
                                                          study_or_trial=trial)
                   for name in ("model.pt", "widths.png", "training.png", "note.md")}
        except optuna.exceptions.UpdateFinishedTrialError:  # failed under its worker: the file it wrote is nobody's
            recorded = {m.artifact_id for m in optuna.artifacts.get_all_artifact_meta(trial, storage=trial.storage)}
            for artifact_id in set(written.ids) - recorded:
                artifact_store.remove(artifact_id)
            raise
    save_note(trial, note)
    return ids


class _Written:
    """An artifact store that remembers the ids it wrote."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store, self.ids = store, []

    def write(self, artifact_id: str, content) -> None:
        self.store.write(artifact_id, content)
        self.ids.append(artifact_id)


def trial_note(number: int, result: TrialResult) -> str:
    """A short markdown summary of a trial: method, hyperparameters and measurements."""
    m, a = result.measurements, result.user_attrs()
    knobs = ", ".join(f"`{k}={v:.3g}`" if isinstance(v, float) else f"`{k}={v}`"
                      for k, v in result.config.params.items())
    params = f"{m.nonzeros:,} non-zeros of {m.params:,} (sparse)" if result.sparse else f"{m.params:,}"
    phases = ", ".join(dict.fromkeys(r.get("phase", "train") for r in result.history)) or "none"
    return "\n".join([
        f"## Trial {number}: {result.config.method}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| model, seed | `{result.config.model}`, {result.config.seed} |",
        f"| hyperparameters | {knobs or '(defaults)'} |",
        *_target_rows(result.config.target),
        f"| accuracy (val / test) | {100 * result.val_accuracy:.2f}% / {100 * result.test_accuracy:.2f}% |",
        f"| parameters | {params} |",
        f"| compression | {a['compression']:.1f}x vs the study's model ({result.baseline_params:,} parameters) |",
        f"| FLOPs | {m.flops:,} |",
        f"| latency ({_latency_setting(result.config.latency)}) | {m.latency_ms:.3f} ms "
        f"(IQR {m.latency_iqr_ms:.3f} ms) |",
        f"| saved size | {m.size_bytes / 1024:.1f} KiB |",
        f"| training | {len(result.history)} epochs ({phases}), {result.seconds:.1f} s |",
        *_input_rows(result.input_spec),
        "",
        "Artifacts: `model.pt` (`autoslim.load_model`), `widths.png`, `training.png`.",
        "",
    ])


def _target_rows(target) -> list[str]:
    """The note's row on the size the trial removed down to (its config's ``target``), if it had one."""
    if target is None:
        return []
    how = "sampled target" if target.rule == "target" else "the method's own rule, capped at the budget"
    return [f"| size target | {target.value:,} {target.measure} ({how}) |"]


def _latency_setting(lat) -> str:
    """How the latency was measured, in words: ``batch 1, CPU, 1 thread``."""
    threads = "default threads" if lat.threads is None else f"{lat.threads} thread{'s' * (lat.threads > 1)}"
    where = "the training device" if lat.device == "study" else "CPU"
    return ", ".join([f"batch {lat.batch_size}", where, threads] + (["ONNX Runtime"] * (lat.runtime == "onnxruntime")))


def _input_rows(spec: dict) -> list[str]:
    """The note's rows on what the model expects: input shape, normalisation, classes."""
    if not spec:
        return []
    numbers = lambda xs: ", ".join(f"{x:.4g}" for x in xs)  # noqa: E731
    classes = spec.get("classes", [])
    shown = ", ".join(f"`{c}`" for c in classes[:10]) + (f" … ({len(classes)} in all)" if len(classes) > 10 else "")
    norm = f", normalised per channel: mean ({numbers(spec['mean'])}), std ({numbers(spec['std'])})" if spec.get(
        "mean") else ""
    return [f"| input | shape {tuple(spec['shape'])}{norm} |", *([f"| classes (output order) | {shown} |"] * bool(classes))]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_widths(result: TrialResult, path: str | Path, *, title: str) -> Path:
    """Bar chart of each conv/linear layer's width (density for sparse results) before and after compression."""
    plt = _pyplot()
    after = result.widths_after
    before = {k: 1.0 for k in after} if result.sparse else result.widths_before
    names = list(before)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.6))
    y = range(len(names))
    ax.barh([i - 0.2 for i in y], [before[n] for n in names], height=0.4, label="before", color="#b0b0b0")
    bars = ax.barh([i + 0.2 for i in y], [after.get(n, 0) for n in names], height=0.4, label="after",
                   color="#1f77b4")
    ax.bar_label(bars, fmt="{:.0%}" if result.sparse else "{:,.0f}", padding=2, fontsize=8)
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("fraction of non-zero weights" if result.sparse else "output channels / neurons")
    ax.set_title(f"{title} - per-layer {'density' if result.sparse else 'width'}")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_training(history: Sequence[dict], path: str | Path, *, title: str) -> Path:
    """Validation accuracy and training loss per epoch; each phase is a shaded, labelled span."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, acc_ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    loss_ax = acc_ax.twinx()
    epochs = [r["epoch"] for r in history]
    acc_ax.plot(epochs, [100 * r["val_accuracy"] for r in history], "o-", color="#1f77b4", label="val accuracy")
    loss_ax.plot(epochs, [r["loss"] for r in history], "s--", color="#d62728", label="train loss")
    start, shade = 0, True
    for i, r in enumerate(history):
        if i + 1 == len(history) or history[i + 1].get("phase") != r.get("phase"):
            lo, hi = history[start]["epoch"] - 0.5, r["epoch"] + 0.5
            acc_ax.axvspan(lo, hi, color="#000000", alpha=0.05 if shade else 0.0)
            acc_ax.axvline(lo, color="#888888", lw=0.8)
            acc_ax.text((lo + hi) / 2, 1.01, r.get("phase", "train"), transform=acc_ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=8)
            start, shade = i + 1, not shade
    acc_ax.set_xlabel("epoch")
    acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.set_ylabel("val accuracy (%)", color="#1f77b4")
    loss_ax.set_ylabel("train loss", color="#d62728")
    acc_ax.set_title(title, pad=16)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
