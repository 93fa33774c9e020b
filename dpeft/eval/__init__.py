"""Evaluating many adapters against one base model, in process; `dpeft.ray.evaluate_adapters` runs the same
evaluator in a pool of Ray actors. Nothing here imports ray.

Layering: this package comes after `train` (it reuses the run config's model and data sections and the training
loss) and before `cli` and `ray`.
"""

from dpeft.eval.driver import evaluate_in_process
from dpeft.eval.evaluator import BUILTIN_METRICS, AdapterEvaluator, EvalSpec, make_spec
from dpeft.eval.sources import AdapterRef, expand_adapters
from dpeft.eval.table import sort_rows, write_table

__all__ = [
    "BUILTIN_METRICS",
    "AdapterEvaluator",
    "AdapterRef",
    "EvalSpec",
    "evaluate_in_process",
    "expand_adapters",
    "make_spec",
    "sort_rows",
    "write_table",
]
