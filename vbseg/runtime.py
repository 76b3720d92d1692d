"""Runtime helpers shared by every model family, the CLI, the experiment runner's workers,
benchmarks and tests: JAX's persistent compilation cache (each grid shape then compiles once per
machine, not once per process) and compile-then-run timing (compile time reported apart from
run time)."""

from __future__ import annotations

import os
import time

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


def compile_and_run(function, args, **static):
    """(result, compile seconds, run seconds): ``function.lower(*args, **static).compile()``
    timed apart from one blocking run of the compiled program."""
    start = time.perf_counter()
    compiled = function.lower(*args, **static).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(*args))
    return result, compile_s, time.perf_counter() - start
