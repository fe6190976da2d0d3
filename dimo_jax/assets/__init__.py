"""Files installed with the package: the bundled digits teacher (assets/teachers/digits)."""

import os

ROOT = os.path.dirname(os.path.abspath(__file__))


def teacher(name: str) -> str:
  """The absolute path of a bundled teacher directory (`digits`), wherever the package is
  installed, so that a config naming it works from any working directory."""
  return os.path.join(ROOT, "teachers", name)
