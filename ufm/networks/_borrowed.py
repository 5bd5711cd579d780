"""The only place ``ufm.networks`` uses helpers of other ``ufm`` modules that are not (yet) public there.

Kept in one small module so that renaming them (``_solver._check_dtype``, ``metrics._prepare``,
``metrics._matrix``) is a change of these lines only.
"""

from .._options import check_dtype as check_dtype
from ..metrics import as_matrix as matrix
from ..metrics import prepare as prepare

__all__ = ["check_dtype", "matrix", "prepare"]
