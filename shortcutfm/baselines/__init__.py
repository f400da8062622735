"""Baselines in one harness: SCFM against training-free solvers and other few-step methods at equal budget.

One module per method, each citing the paper and equation it implements: :mod:`.scfm`, :mod:`.progressive`,
:mod:`.consistency`, :mod:`.reflow`, :mod:`.shortcut`, :mod:`.meanflow`; the teacher's solvers in
:mod:`.solvers`; the shared training loop, selection, sweep and report in :mod:`.harness`
(``shortcutfm bench``).
"""

from .harness import BUDGETS, METHOD_NFE, METHODS, SOLVER_NFE, Budget, build_method, fit, run_bench
from .solvers import SOLVERS, solve

__all__ = ["BUDGETS", "METHODS", "METHOD_NFE", "SOLVERS", "SOLVER_NFE", "Budget", "build_method", "fit",
           "run_bench", "solve"]
