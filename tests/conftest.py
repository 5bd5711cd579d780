"""Test configuration: one BLAS thread, float64 on, and a persistent compilation cache shared by the whole run.

BLAS threads. NumPy's OpenBLAS starts one thread per core and spins them on every small product; with the two
pytest-xdist workers (and XLA's own thread pool) on a loaded 2-core machine this oversubscribes the cores, and
parts of the suite ran 3-100x slower. ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = 1 are set
here, before NumPy is first imported (OpenBLAS reads them once, at load time), unless the environment already sets
them: ``OPENBLAS_NUM_THREADS=2 pytest ...`` measures the other way. Subprocess tests inherit them.

The suite's time is dominated by XLA compiles. JAX_COMPILATION_CACHE_DIR (set here if unset, and inherited by
subprocess tests such as the CLI's) lets a compile done once be reused by later tests and subprocesses.
"""

import os
import sys
import tempfile

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
if "numpy" in sys.modules:  # too late for OpenBLAS's thread count: a plugin imported NumPy before this file
    import warnings

    warnings.warn("tests/conftest.py: numpy was imported before the BLAS thread count could be set", stacklevel=1)

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ufm-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
