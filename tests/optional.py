"""Optional packages a test needs: without them the test module (or test) is skipped, saying
which extra installs them, instead of failing to collect.

  from tests.optional import need
  need("torch", "yaml")          # at the top of a module, before importing them
"""

import importlib.util

import pytest

# package -> the extra of pyproject.toml that installs it
EXTRAS = {"torch": "convert", "yaml": "convert", "safetensors": "convert",
          "diffusers": "convert", "transformers": "convert", "tensorflow_datasets": "data",
          "tensorflow": "data", "wandb": "wandb"}


def missing(*modules: str) -> list:
  return [m for m in modules if importlib.util.find_spec(m) is None]


def need(*modules: str) -> None:
  """Skips the calling module or test unless every one of `modules` is importable."""
  absent = missing(*modules)
  if absent:
    extras = sorted({EXTRAS.get(m, "test") for m in absent})
    pytest.skip(f"needs {', '.join(absent)}: pip install -e '.[{','.join(extras)}]'",
                allow_module_level=True)
