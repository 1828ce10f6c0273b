"""fedanchor bench: every rival on one split, scored the same way.

``python -m fedanchor bench --scenario motion --trunk tiny --quick --out runs/bench-motion``
"""
from .runner import BenchResult, run_bench

__all__ = ["BenchResult", "run_bench"]
