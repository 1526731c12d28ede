"""The model file: a compressed model as plain data that ``torch.load(path, weights_only=True)`` reads.

``model.pt`` is a dict saved with :func:`torch.save`::

    {"format": "autoslim-model-1",
     "spec": {"model", "model_kwargs", "model_adapt" (absent in older files: []), "in_shape", "num_classes", "method", "method_params",
              "architecture": autoslim.surgery.architecture_spec(model),
              "input": {"shape", "mean", "std", "classes"}},     # what the model expects (may be absent)
     "sparse": bool,
     "state_dict": {name: tensor}      # or, for sparse results, autoslim.sparse.sparse_state_dict
    }

:func:`load_model` rebuilds the network from it: the registry model (or the
method's own architecture for methods that build one), reshaped by
:func:`autoslim.surgery.apply_architecture_spec`, then the weights. A file that
is not one is a UsageError line naming the file and what is wrong.

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

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from autoslim.config import TrialConfig
from autoslim.errors import UsageError, load_error
from autoslim.sparse import load_sparse_state_dict, sparse_state_dict
from autoslim.surgery import apply_architecture_spec, architecture_spec
from autoslim.trial import build_model, check_trial_config

FORMAT = "autoslim-model-1"


def save_model(path: str | Path, model: nn.Module, *, config: TrialConfig, in_shape: Sequence[int],
               num_classes: int, sparse: bool = False, input_spec: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (weights + architecture spec) to ``path``; sparse models keep their sparse encoding.

    ``input_spec`` (:meth:`autoslim.data.Data.input_spec`: shape, mean, std, classes) says what the model
    expects; it is kept as ``spec["input"]``."""
    spec = {"model": config.model, "model_kwargs": dict(config.model_kwargs), "model_adapt": list(config.model_adapt),
            "in_shape": [int(s) for s in in_shape],
            "num_classes": int(num_classes), "method": config.method, "method_params": dict(config.params),
            "architecture": architecture_spec(model), **({"input": dict(input_spec)} if input_spec else {})}
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
    if not isinstance(saved["spec"].get("input", {}), dict):
        raise UsageError(f"model file: {what}: spec.input is not a dict; accepted: shape, mean, std, classes")
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
                                                   model=spec["model"], model_kwargs=spec["model_kwargs"],
                                                   model_adapt=spec.get("model_adapt", [])))
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
        kind = "" if isinstance(e, UsageError) else f"{type(e).__name__}: "  # a UsageError line names its field
        raise UsageError(f"model file: {what}: {problem}: {kind}{detail}".rstrip(": ")) from None
