"""Shared by the command lines (sami_jax.main, sami_jax.compare): how a user error is shown."""

from __future__ import annotations

import os


def raised_by_sami_jax(error: BaseException) -> bool:
  """Whether the innermost frame of the error is in sami_jax's own code: those errors are written
  for users (they say what is wrong and the fix), so they are shown without a stack trace."""
  tb, last = error.__traceback__, None
  while tb is not None:
    last, tb = tb, tb.tb_next
  marker = f"{os.sep}sami_jax{os.sep}"
  return last is not None and marker in last.tb_frame.f_code.co_filename


class _QuietLibraries:
  """Drops library log records a user does not need; real warnings still show.

  - INFO records from Orbax / TFDS / grain internals;
  - JAX's "Unable to initialize backend 'tpu'" (INFO: on a machine without that accelerator it
    is expected, not news);
  - TFDS's "Using custom data configuration" (every run of our own builders passes one, so the
    warning says nothing) and "Variant folder ... has no dataset_info.json" (a folder a build in
    progress has not finished yet; a damaged dataset fails loudly when it is read).
  """

  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/absl/testing/")
  _EXPECTED = ("Unable to initialize backend", "Using custom data configuration",
               "Variant folder")

  def filter(self, record) -> bool:
    try:
      message = record.getMessage()
    except Exception:  # pylint: disable=broad-except  (a malformed record: let it through)
      return True
    if message.startswith(self._EXPECTED):
      return False
    if record.levelno >= 30:
      return True
    return not any(part in record.pathname for part in self._NOISY)


def quiet_library_logs() -> None:
  """Installs the _QuietLibraries filter on the root logger, absl's handler and JAX's logger."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  quiet = _QuietLibraries()
  std_logging.getLogger().addFilter(quiet)
  for name in ("jax", "jax._src.xla_bridge", "absl"):
    std_logging.getLogger(name).addFilter(quiet)
  logging.get_absl_handler().addFilter(quiet)
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(quiet)
