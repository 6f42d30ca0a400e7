"""Shared by the command lines (sami_jax.main, sami_jax.compare): how a user error is shown."""

from __future__ import annotations

import errno
import os
import sys


def raised_by_sami_jax(error: BaseException) -> bool:
  """Whether the innermost frame of the error is in sami_jax's own code: those errors are written
  for users (they say what is wrong and the fix), so they are shown without a stack trace."""
  tb, last = error.__traceback__, None
  while tb is not None:
    last, tb = tb, tb.tb_next
  marker = f"{os.sep}sami_jax{os.sep}"
  return last is not None and marker in last.tb_frame.f_code.co_filename


_OS_FIXES = {
    errno.ENOSPC: "free disk space there (or use another directory) and rerun; finished "
                  "checkpoints are kept",
    errno.EDQUOT: "free space within your quota (or use another directory) and rerun",
    errno.EACCES: "use a directory you can write to (or fix its permissions)",
    errno.EPERM: "use a directory you can write to (or fix its permissions)",
    errno.EROFS: "the file system is read-only: use a writable directory",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: use another path",
    errno.EEXIST: "a file of that name is in the way: use another path or move the file",
    errno.EISDIR: "that path is a directory; give a file",
    errno.ELOOP: "the path has a symbolic link loop: fix or remove the link",
    errno.ENOENT: "check the path",
}


def os_error_line(error: OSError) -> str:
  """One line for a user: what failed, on which path, and the fix."""
  what = error.strerror or str(error) or type(error).__name__
  where = f": {error.filename}" if error.filename else ""
  if getattr(error, "filename2", None):
    where += f" -> {error.filename2}"
  fix = _OS_FIXES.get(error.errno, "check the path and its permissions")
  return f"Error: {what}{where} ({fix})."


def report_user_error(error: BaseException) -> bool:
  """Prints the one-line message of a user error to stderr; False when it is not one (a bug, to
  be shown with its stack trace). OSErrors are always the user's environment (a full disk, a
  read-only or missing directory); the other types are user errors when sami_jax raised them."""
  if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) or (
      isinstance(error, FileNotFoundError) and not raised_by_sami_jax(error)):
    print(os_error_line(error), file=sys.stderr)
    return True
  if isinstance(error, (ValueError, FileNotFoundError, RuntimeError, FloatingPointError,
                        KeyError)) and raised_by_sami_jax(error):
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"Error: {text}", file=sys.stderr)
    return True
  return False


def _chain(error: BaseException) -> list[BaseException]:
  out, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    out.append(error)
    error = error.__cause__ or error.__context__
  return out


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return " ".join(text[-1].split()) if text else type(error).__name__


def flag_error_line(error: BaseException, argv: list[str]) -> tuple[str, int] | None:
  """The one-line message and exit status for an error raised while parsing the command line
  (including loading the --config file), or None if it is not a user error.

  - The config file cannot be loaded (missing, a directory, a syntax error, a failed import, no
    get_config, an unknown variant): "Error: could not load --config=...: <cause>".
  - A --config.x=... override names no field: "Error: unknown config field ...".
  - absl's own flag errors keep its wording (exit 1).
  """
  config = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
  chain = _chain(error)
  inner = chain[-1]
  loading = any(isinstance(e, (SyntaxError, ImportError, OSError)) for e in chain) or any(
      "get_config" in str(e) or "Error whilst parsing config file" in str(e)
      or "earlier failure to load" in str(e) for e in chain)
  if loading:
    cause = f"{type(inner).__name__}: {_first_line(inner).rstrip('.')}"
    if isinstance(inner, SyntaxError) and inner.lineno:
      cause = f"SyntaxError: {inner.msg} ({inner.filename}, line {inner.lineno})"
    if isinstance(inner, AttributeError) and "get_config" in str(inner):
      cause = "the file defines no get_config(arg) function"
    return (f"Error: could not load --config={config}: {cause}. A config file is a Python file "
            "with get_config(arg=None) returning a config (see configs/disks.py); "
            "--config=FILE:VARIANT passes VARIANT as arg.", 2)
  if isinstance(error, (AttributeError, KeyError)):
    cause = error.args[0] if error.args else error
    while isinstance(cause, (AttributeError, KeyError)) and cause.args:
      cause = cause.args[0]  # config_flags wraps the KeyError that holds the message
    text = " ".join(str(cause).replace("'", "").split())
    given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    return (f"Error: unknown config field: {text} (in {', '.join(given)}; every field is defined "
            "in sami_jax/configlib.py).", 2)
  from absl import flags  # pylint: disable=g-import-not-at-top
  if isinstance(error, flags.Error):
    return (f"FATAL Flags parsing error: {_first_line(error)}\nPass --helpshort or --helpfull "
            "to see help on flags.", 1)
  return None


def stray_argument_line(stray: list[str], argv: list[str]) -> str:
  """One line for arguments that are not options (the command lines take none), with the likely
  fix: a value given after a flag without `=` (`--config.train.write_grids false` sets the flag to
  true and leaves `false` over), a field without the `--config.` prefix (`optim.lr=0.1`), or a
  missing `--`."""
  arg = stray[0]
  more = f" (and {len(stray) - 1} more: {stray[1:]})" if len(stray) > 1 else ""
  position = argv.index(arg) if arg in argv else -1
  before = argv[position - 1] if position > 0 else ""
  if before.startswith("--") and len(before) > 2 and "=" not in before:
    return (f"Error: unexpected argument {arg!r} after {before}{more}: give a flag's value with "
            f"'=': {before}={arg}.")
  name = arg.lstrip("-")
  if "=" in arg and name.startswith("config."):
    return f"Error: unexpected argument {arg!r}{more}: options start with '--': --{name}."
  if "=" in arg and not arg.startswith("-"):
    return (f"Error: unexpected argument {arg!r}{more}: a config field needs the --config. "
            f"prefix: --config.{arg} (every field is defined in sami_jax/configlib.py).")
  return (f"Error: unexpected argument {arg!r}{more}: this command takes only options "
          "(--config=FILE, --workdir=DIR, --config.SECTION.FIELD=VALUE); a value needs its flag "
          "and '=', e.g. --config.optim.lr=0.001.")


def parse_flags(argv: list[str], config_flag) -> list[str]:
  """absl's flag parsing, with the --config file loaded at once, and every user mistake in it
  (a stray argument included) reported in one line (see flag_error_line) instead of a stack
  trace or the flags' help."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    rest = flags.FLAGS(argv)
    if len(rest) > 1:
      print(stray_argument_line(rest[1:], argv), file=sys.stderr)
      sys.exit(2)
    if config_flag.value is not None:
      config_flag.value.lock()  # loads the file now, so that its errors are reported here
    return rest
  except Exception as e:  # pylint: disable=broad-except
    found = flag_error_line(e, argv)
    if found is None:
      raise
    print(found[0], file=sys.stderr)
    sys.exit(found[1])


class _QuietLibraries:
  """Drops library log records a user does not need; real warnings still show.

  - INFO records from Orbax / TFDS / grain internals;
  - JAX's "Unable to initialize backend 'tpu'" (INFO: on a machine without that accelerator it
    is expected, not news);
  - TFDS's "Variant folder ... has no dataset_info.json" (a folder a build in progress has not
    finished yet; a damaged dataset fails loudly when it is read). Its "Using custom data
    configuration" is dropped where our builders live (data/base.py), for the API too.
  """

  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/absl/testing/")
  _EXPECTED = ("Unable to initialize backend", "Variant folder")

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
