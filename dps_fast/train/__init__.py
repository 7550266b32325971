"""The `dps-train` application: an application of dps_fast's public API, kept apart
from the library. ``dps_fast.train.main`` is the console script."""
from .cli import main, parse_args
from .experiment import ExperimentData, model_from_args
from .loop import run

__all__ = ["main", "parse_args", "run", "ExperimentData", "model_from_args"]
