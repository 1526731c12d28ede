"""One trial's configuration, checked as a study checks the trials it samples.

A trial's :class:`~autoslim.config.TrialConfig` names a method, a model and a
data set (checked against their registries) and the method's parameters
(checked against its search space; the ones it leaves out take their
defaults). ``autoslim train`` and :func:`autoslim.run_trial` accept exactly
what a study would have run.

>>> from autoslim.config import TrialConfig
>>> full, filled = check_trial_config(TrialConfig(method="trimming", params={"rounds": 1}, model="lenet5"))
>>> full.params["rounds"], filled["rule"], "rounds" in filled
(1, 'std', False)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from autoslim.config import TrialConfig, load_yaml
from autoslim.data import DATASETS
from autoslim.errors import UsageError
from autoslim.methods import get_method
from autoslim.models import MODELS

# What a trial's config.yaml must hold (autoslim export writes every field); params left out are filled in.
TRIAL_KEYS = ["method", "model", "data", "train", "seed"]


def check_trial_config(config: TrialConfig) -> tuple[TrialConfig, dict]:
    """``config`` as a study checks a trial's, with the method's parameters it leaves out filled in from the
    method's search space; and the parameters so filled (empty for a trial a study sampled).

    The method, model and data names must be registered; every parameter must be one of the method's and in
    its range (``params.<name>``: the UsageError line of a study file's override)."""
    method = get_method(config.method)
    DATASETS.get(config.data.name)
    MODELS.get(config.model)
    if not isinstance(config.params, dict):
        raise UsageError(f"params: expected a mapping of {config.method}'s parameters, got {config.params!r}")
    params = method.search_space().complete(config.params, where="params")
    return dataclasses.replace(config, params=params), {k: v for k, v in params.items() if k not in config.params}


def load_trial_config(path: str | Path) -> TrialConfig:
    """A trial's ``config.yaml`` (``autoslim export`` writes it), refused in one line if it lacks a section of a
    trial (:data:`TRIAL_KEYS`) or if the study would refuse it (:func:`check_trial_config`)."""
    raw = load_yaml(path, "config file")
    missing = [key for key in TRIAL_KEYS if key not in raw]
    if missing:
        raise UsageError(f"config file: {path} has no {missing[0]!r}; accepted: a trial's config.yaml with "
                         f"{', '.join(TRIAL_KEYS)} (and params, model_kwargs, device), as autoslim export writes it")
    config = TrialConfig.from_dict(raw)
    check_trial_config(config)
    return config
