"""JAX's persistent compilation cache for ufm: opt-in for the library, on by default for the command line.

A fresh process compiles every solver program again (seconds each on a CPU); with the persistent cache the
compiled executables are read back from disk. `enable_compilation_cache` turns it on, honouring JAX's own
``JAX_COMPILATION_CACHE_DIR`` environment variable (and an already configured ``jax_compilation_cache_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

DEFAULT_DIR = Path("~/.cache/ufm/jax").expanduser()


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache for every program compiled from now on (all of them, no
    minimum compile time or size), and return its folder.

    Args:
      path: the cache folder. Default: ``jax_compilation_cache_dir`` if already configured, else the environment
        variable ``JAX_COMPILATION_CACHE_DIR``, else ``~/.cache/ufm/jax``.

    Returns:
      The folder used (created if needed).

    Example:
      >>> import ufm
      >>> folder = ufm.enable_compilation_cache()  # doctest: +SKIP
    """
    if path is None:
        path = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_DIR  # type: ignore[attr-defined]  # set on jax's Config at runtime; its stub omits it
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
