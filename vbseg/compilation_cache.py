"""JAX's persistent compilation cache, shared by the CLI, the experiment runner's workers,
benchmarks and tests: each grid shape then compiles once per machine, not once per process."""

from __future__ import annotations

import os

import jax


def enable_compilation_cache(path: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache so each grid shape compiles once per machine.

    The folder is ``path``, else $VBSEG_JAX_CACHE, else ~/.cache/vbseg/jax.
    """
    folder = path or os.environ.get("VBSEG_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vbseg", "jax"
    )
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return folder
