"""Files that `sample` and `evaluate` write: an existing file is replaced only when it is of the
kind the command writes (a PNG for a PNG, an .npz for an .npz), so a mistyped `--out thesis.tex`
never turns a user's document into image bytes. `--overwrite` lifts the check where a command
offers it.
"""

import os

from dimo_jax.errors import UserError

# The first bytes of each kind of output; an .npz is a zip archive (empty: the end record).
SIGNATURES = {
    "png": ((b"\x89PNG\r\n\x1a\n",), "a PNG image"),
    "npz": ((b"PK\x03\x04", b"PK\x05\x06"), "an .npz archive"),
}


class OutputError(UserError):
  """An output path that would replace something the command did not write."""


def check_writable_folder(folder: str, what: str, error=None) -> None:
  """Raises `error` (OutputError by default) naming `what` unless `folder` can be created or
  written: the nearest existing folder of its path must be a folder (not a file) this user
  may write into (not on a read-only mount)."""
  error = error or OutputError
  folder = os.path.abspath(folder)
  while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
    if os.path.lexists(folder):
      raise error(f"{what}: {folder} is a file, not a folder")
    folder = os.path.dirname(folder)
  if not os.access(folder, os.W_OK | os.X_OK):
    raise error(f"{what}: cannot write into {folder} (read-only, or not this user's)")


def check_replaceable(path: str, kind: str, flag: str, overwrite: bool = False) -> None:
  """Raises `OutputError` unless writing the `kind` output ("png", "npz") at `path` (given by
  `flag`) loses nothing: `path` does not exist, or is a file of that kind, or `overwrite` is set
  and it is a file. A folder is never replaced. The folder it goes into (or the nearest one
  that exists) must be writable: this is checked before any work is done."""
  check_writable_folder(os.path.dirname(os.path.abspath(path)), f"{flag} {path}", OutputError)
  if not os.path.lexists(path):
    return
  if os.path.isdir(path):
    raise OutputError(f"{flag} {path}: is a folder; give the path of the file to write")
  if overwrite:
    return
  signatures, what = SIGNATURES[kind]
  try:
    with open(path, "rb") as f:
      head = f.read(max(len(s) for s in signatures))
  except OSError as e:
    raise OutputError(f"{flag} {path}: exists and cannot be read ({e.strerror or e}), so it "
                      "is not replaced") from e
  if not any(head.startswith(s) for s in signatures):
    raise OutputError(f"{flag} {path}: exists and is not {what}, so it is not replaced "
                      "(choose another path, or pass --overwrite to replace it)")
