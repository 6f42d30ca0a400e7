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
  """Drops INFO records from Orbax / TFDS / grain internals; their warnings still show."""

  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/absl/testing/")

  def filter(self, record) -> bool:
    if record.levelno >= 30:
      return True
    return not any(part in record.pathname for part in self._NOISY)


def quiet_library_logs() -> None:
  """Installs the _QuietLibraries filter on the root logger and absl's handler."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  std_logging.getLogger().addFilter(_QuietLibraries())
  logging.get_absl_handler().addFilter(_QuietLibraries())
