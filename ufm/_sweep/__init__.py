"""Sweeps: thousands of UFM solves, chunk by chunk through `ufm.solve_batch`, in this process or on a Dask
cluster, saved run by run in a resumable, checksummed store.

The package, one concept per module:

* `grid`: grid expansion and validation (`expand_grid`, `run_id`);
* `runner`: grouping, fixed-size chunks (`plan`) and the `solve_batch` calls, one per device part of a chunk;
* `records`: the per-run record (ranks, prediction, check verdict, layer metrics) and `solve_chunk`, the task a
  Dask worker runs;
* `store`: the single-writer JSON-lines store, its lock and checksums;
* `columns`: records as NumPy columns or a pandas DataFrame;
* `progress`: the tqdm bar;
* `driver`: `sweep` (`prepare_sweep`, then `PreparedSweep.run`), `load_sweep`, `rerun`, `iter_fields`;
* `cli`: ``ufm sweep CONFIG``.

Every run uses the PRNG key ``jax.random.key(seed)`` and the chunk layout is a function of the grid and
``chunk_size`` alone, so an interrupted sweep resumed with the same grid recomputes unfinished chunks exactly as
the uninterrupted sweep would and skips the finished runs.
"""

from .cli import sweep_main as sweep_main
from .columns import frame_records as frame_records
from .columns import to_columns as to_columns
from .columns import to_frame as to_frame
from .driver import PreparedSweep as PreparedSweep
from .driver import SweepResult as SweepResult
from .driver import as_records as as_records
from .driver import iter_fields as iter_fields
from .driver import load_sweep as load_sweep
from .driver import prepare_sweep as prepare_sweep
from .driver import rerun as rerun
from .driver import sweep as sweep
from .grid import CONFIG_FIELDS as CONFIG_FIELDS
from .grid import GRID_FIELDS as GRID_FIELDS
from .grid import PROBLEM_FIELDS as PROBLEM_FIELDS
from .grid import SOLVER_FIELDS as SOLVER_FIELDS
from .grid import expand_grid as expand_grid
from .grid import problem_of as problem_of
from .grid import run_id as run_id
from .runner import plan as plan
from .store import SCHEMA as SCHEMA
from .store import IncompatibleStoreError as IncompatibleStoreError
from .store import StoreIntegrityWarning as StoreIntegrityWarning
