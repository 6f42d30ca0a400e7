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
