"""sami_jax: SAMI (score-based autoencoder for multiscale inference) in JAX/Flax.

    import sami_jax
    model = sami_jax.load("/path/to/workdir")   # see sami_jax.api

`load` and `Model` are imported on first use, so `import sami_jax` stays cheap (no JAX import).
Importing the package adds the project's XLA:CPU flag to XLA_FLAGS (convolutions by XLA's own
library, about 2x faster train steps on CPU; see `sami_jax.utils.xla_options`, opt out with
SAMI_JAX_XLA_FLAGS=off), and sets glibc's malloc to keep freed memory for reuse instead of
returning it to the kernel after every XLA execution (no page faults from XLA's temporaries
below 64 MB: 0.81x the quick-start step time under jax 0.12; see `sami_jax.utils.host_memory`,
opt out with SAMI_JAX_HOST_MALLOC=off).
"""

from __future__ import annotations

from typing import Any

from sami_jax.utils import host_memory as _host_memory
from sami_jax.utils import xla_options as _xla_options

__version__ = "0.1.0"

_xla_options.apply_process_flags()
_host_memory.apply_process_settings()

_LAZY = {"load": "sami_jax.api", "Model": "sami_jax.api"}


def __getattr__(name: str) -> Any:
  # PEP 562: resolved on first access only, so importing the package does not import JAX.
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'sami_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + list(_LAZY))
