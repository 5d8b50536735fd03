"""NeMo-Run recipes for SALM and BESTOW (tiny .. 70B) and their executors (local, SLURM).

``configs`` holds the plain configs and layouts (no NeMo-Run needed); ``factories`` turns them into
``run.Partial``/``run.Script``; ``executors`` makes the local or SLURM executor; ``python -m
recipes`` does both from the command line.
"""

from .configs import TRAINING, Recipe

__all__ = ["TRAINING", "Recipe"]
