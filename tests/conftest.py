"""Test configuration: float64 on, and a persistent compilation cache shared by the whole run.

The suite's time is dominated by XLA compiles. JAX_COMPILATION_CACHE_DIR (set here if unset, and inherited by
subprocess tests such as the CLI's) lets a compile done once be reused by later tests and subprocesses.
"""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ufm-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
