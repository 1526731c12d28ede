"""autoslim: an Optuna plugin that finds small neural networks.

A study searches over compression methods and their hyperparameters; every
trial trains a network, compresses it so that it is really smaller, and
reports validation accuracy and parameter count to a Pareto front.

>>> import autoslim
>>> "trimming" in autoslim.list_methods()
True
"""

from autoslim.config import DataConfig, StudyConfig, TrainConfig, TrialConfig, load_study
from autoslim.data import load_data, register_dataset
from autoslim.errors import UsageError
from autoslim.fit import Hooks, OptimizerFactory
from autoslim.modelfile import load_model
from autoslim.measure import measure
from autoslim.methods import CompressionResult, Method, TrialContext, get_method, list_methods, register_method
from autoslim.models import create_model, list_models, register_model
from autoslim.trial import run_trial
from autoslim.plan import Plan, objectives, suggest
from autoslim.search.halving import report_rung
from autoslim.search.pareto import pareto_front
from autoslim.study import open_study, optimize
from autoslim.train import Callback, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "Callback", "CompressionResult", "DataConfig", "Hooks", "Method", "OptimizerFactory", "Plan", "StudyConfig",
    "TrainConfig", "TrialConfig", "TrialContext", "UsageError", "create_model", "evaluate", "get_method",
    "list_methods", "list_models", "load_data", "load_model", "load_study", "measure", "objectives", "open_study",
    "optimize", "pareto_front", "register_dataset", "register_method", "register_model", "report_rung", "run_trial",
    "suggest", "train",
]
