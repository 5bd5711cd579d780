"""Global search for the optimum of a UFM where theory is open: `explore`.

Where `ufm.predict` is not a theorem (deep ReLU with K >= 3, deep cross-entropy, imbalanced deep ReLU), the
global optimum is unknown and gradient methods are strongly biased towards deep neural collapse (THEORY.md §4.3).
`explore` spends a start or time budget on a portfolio of strategies, all run through ONE compiled
`ufm.solve_batch` program (fixed batch size, L-BFGS, explicit initial parameters), deduplicates the local minima it
reaches by loss and rotation-invariant structure (the lowest ones polished at their ReLU kinks first), and
reports the best point with `ufm.check` verdicts.

Modules: `starts` (the strategies: where each local solve starts), `rounds` (one batched round), `minima` (the
distinct minima and their deduplication), `structure` (the rotation-invariant fingerprint of a point), `result`
(the `Exploration`), `search` (the loop and the budgets).

Strategies (each start remembers which one produced it):

* ``explicit``: the explicit candidates of `ufm.construct` (DNC and, where defined, the SRG point of Súkeník,
  Mondelli & Lampert 2024), evaluated as they are and polished; so the result is never above them.
* ``random``: Gaussian starts (`ufm.init_params` convention) at scales 0.5, 1, 2 (never near the zero saddle).
* ``low-rank``: class means of H and the map before the last ReLU of rank r < K (r drawn in 1..K-1).
* ``perturbed``: DNC / SRG plus relative Gaussian noise of size 0.1-0.5.
* ``continuation``: solve at 2-4 x the weight decays (where low rank is favoured), then move the λ's back.
* ``truncate``: project the class means of every pre-activation Z_2..Z_L of one of the lowest minima onto its top
  r directions (r: the best minimum's rank before the last ReLU, or drawn in 2..K-1), and re-solve.
* ``hop``: basin hopping: perturb one of the best minima found so far (relative noise 0.03-0.5) and re-solve.
* ``rank-hop``: lower by one the rank of a pre-activation's class means at one of the best minima, and re-solve.
* ``gd`` (not in the default portfolio): a large-step gradient-descent phase (lr 0.5) before L-BFGS.
"""

from .minima import Minimum
from .result import Exploration
from .search import explore
from .starts import DEFAULT_STRATEGIES, PRIOR_WEIGHTS, STRATEGIES
from .structure import RANK_RTOL, structure

__all__ = [
    "DEFAULT_STRATEGIES",
    "PRIOR_WEIGHTS",
    "RANK_RTOL",
    "STRATEGIES",
    "Exploration",
    "Minimum",
    "explore",
    "structure",
]
