"""Test-session settings: the repository on sys.path and a shared XLA compilation cache.

Several tests build the same jitted train step; the persistent cache compiles it once per
session (and once per CI run), which is most of the suite's wall time on a 2-core machine.
"""

import os
import tempfile

import jax

_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dimo_jax_test_xla_cache"))
# Through the environment too, so that subprocesses started by tests share the cache.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
