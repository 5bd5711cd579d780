"""ufm: unconstrained features models of neural collapse, solved and checked against theory, in JAX."""

from . import metrics as metrics
from ._certificates import Certificate as Certificate
from ._certificates import certify as certify
from ._certificates import hessian_spectrum as hessian_spectrum
from ._checks import Report as Report
from ._checks import check as check
from ._explore import Exploration as Exploration
from ._explore import Minimum as Minimum
from ._explore import explore as explore
from ._explore import structure as structure
from ._io import Results as Results
from ._io import ResultsError as ResultsError
from ._io import load_results as load_results
from ._io import save_results as save_results
from ._model import Forward as Forward
from ._model import Params as Params
from ._model import fit_loss as fit_loss
from ._model import forward as forward
from ._model import init_params as init_params
from ._model import objective as objective
from ._model import objective_parts as objective_parts
from ._model import regulariser as regulariser
from ._model import targets as targets
from ._problem import UFM as UFM
from ._solution import History as History
from ._solution import Snapshots as Snapshots
from ._solution import Solution as Solution
from ._solver import solve as solve
from ._solver import solve_batch as solve_batch
from ._sweep import load_sweep as load_sweep
from ._sweep import rerun as rerun
from ._sweep import sweep as sweep
from ._theory import Prediction as Prediction
from ._theory import construct as construct
from ._theory import predict as predict
from ._theory import srg_ratio as srg_ratio

__version__ = "0.1.0"
from ._cache import enable_compilation_cache as enable_compilation_cache
