"""Where a run's numbers and pictures go: TensorBoard event files (tensorboardX, no TensorFlow),
Weights & Biases when asked (`config.writers`), and one log line per window.

  writer = writers.create(workdir, config)      # process 0 writes; the others only log
  writer.write_scalars(step, {"loss": 0.3})
  writer.write_images(step, {"grid": uint8[N, H, W, 3]})
  writer.write_hparams(flat config, final metrics)

`WindowMean` averages the step's metrics over a logging window on the device (clu.metrics),
so a logged loss is the window's mean, not the last step's.
"""

import logging as std_logging
import time
from typing import Any, Dict, Iterable, Optional

from absl import logging
import jax
import numpy as np

WRITERS = ("tensorboard", "wandb")  # what `config.writers` may name


def flat_hparams(config: Any, prefix: str = "") -> Dict[str, Any]:
  """A config (ConfigDict or dict) as {dotted key: bool | int | float | str} for hparams."""
  out = {}
  items = config.items() if hasattr(config, "items") else []
  for key, value in items:
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      out.update(flat_hparams(value, f"{name}."))
    elif isinstance(value, (bool, int, float, str)):
      out[name] = value
    else:
      out[name] = str(value)
  return out


class Writer:
  """TensorBoard (and wandb) on process 0; every process logs one line per write_scalars."""

  def __init__(self, workdir: str, kinds: Iterable[str] = ("tensorboard",),
               config: Optional[Dict[str, Any]] = None, active: bool = True):
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in WRITERS]
    if unknown:
      raise ValueError(f"writers: unknown {unknown}; known: {list(WRITERS)}")
    self._tb = self._wandb = None
    if active and "tensorboard" in kinds:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(workdir, flush_secs=30)
    if active and "wandb" in kinds:
      import wandb  # optional: pip install "dimo_jax[wandb]"
      self._wandb = wandb.init(dir=workdir, config=config, resume="allow")

  def write_scalars(self, step: int, scalars: Dict[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in scalars.items()))
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, step)
    if self._wandb is not None:
      self._wandb.log(scalars, step=step)

  def write_images(self, step: int, images: Dict[str, np.ndarray]) -> None:
    """`images`: name -> uint8[N, H, W, 3] (or [H, W, 3])."""
    for key, value in images.items():
      value = np.asarray(value)
      if self._tb is not None:
        self._tb.add_images(key, value if value.ndim == 4 else value[None], step,
                            dataformats="NHWC")
      if self._wandb is not None:
        import wandb
        frames = np.reshape(value, (-1,) + value.shape[-3:])
        self._wandb.log({key: [wandb.Image(v) for v in frames]}, step=step)

  def write_hparams(self, hparams: Dict[str, Any], metrics: Dict[str, float],
                    step: int = 0) -> None:
    """The run's hyper-parameters beside its final metrics (TensorBoard's HPARAMS tab; the
    session is the run WORKDIR/hparams)."""
    metrics = {k: float(v) for k, v in metrics.items() if np.isfinite(float(v))}
    if self._tb is not None:
      self._tb.add_hparams(flat_hparams(hparams), metrics, name="hparams", global_step=step)
    if self._wandb is not None:
      self._wandb.summary.update(metrics)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def create(workdir: str, config) -> Writer:
  """The run's writer: `config.writers` (default TensorBoard only) on process 0."""
  kinds = tuple(config.get("writers", ("tensorboard",)))
  return Writer(workdir, kinds, flat_hparams(config), active=jax.process_index() == 0)


class WindowMean:
  """The mean of each step metric over a logging window, accumulated on the device
  (`clu.metrics.Average`, no host sync per step), plus the window's steps/s."""

  def __init__(self):
    self._sums, self._steps, self._start = None, 0, time.perf_counter()

  def add(self, metrics: Dict[str, jax.Array]) -> None:
    from clu import metrics as clu_metrics
    new = {k: clu_metrics.Average.from_model_output(v) for k, v in metrics.items()}
    self._sums = new if self._sums is None else {k: self._sums[k].merge(v)
                                                 for k, v in new.items()}
    self._steps += 1

  def result(self) -> Dict[str, float]:
    """The window's means and `steps_per_s`; starts the next window."""
    out = {k: float(v.compute()) for k, v in jax.device_get(self._sums or {}).items()}
    now = time.perf_counter()
    out["steps_per_s"] = self._steps / max(now - self._start, 1e-9)
    self._sums, self._steps, self._start = None, 0, now
    return out


class _BelowWarningFrom(std_logging.Filter):
  """Drops records under WARNING logged from files under a package folder (`/orbax/`)."""

  def __init__(self, folder: str):
    super().__init__()
    self.folder = folder

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or self.folder not in record.pathname


class _UnretrievedTaskErrors(std_logging.Filter):
  """Drops asyncio's "Task exception was never retrieved": when one read of a damaged
  checkpoint fails, orbax's sibling reads (asyncio tasks) fail the same way and asyncio logs
  each as a traceback whenever they are collected, which can be before the one-line error
  that already says it. The first failure is still raised; nothing here uses asyncio itself."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Task exception was never retrieved")


def quiet_orbax() -> None:
  """Orbax at WARNING: its INFO lines (through absl's logger) would fill stderr around the
  progress bar; its failed sibling reads unlogged (`_UnretrievedTaskErrors`). Idempotent."""
  logger = std_logging.getLogger("absl")
  if not any(isinstance(f, _BelowWarningFrom) for f in logger.filters):
    logger.addFilter(_BelowWarningFrom("/orbax/"))
  std_logging.getLogger("orbax").setLevel(std_logging.WARNING)
  quiet = std_logging.getLogger("asyncio")
  if not any(isinstance(f, _UnretrievedTaskErrors) for f in quiet.filters):
    quiet.addFilter(_UnretrievedTaskErrors())
