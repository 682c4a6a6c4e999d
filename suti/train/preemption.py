"""SIGTERM (preemption of a spot VM / TPU, SLURM's time limit signal) becomes "save a checkpoint and exit".

Single process: a signal handler sets a flag that the loop reads after each step. Several processes: JAX's
preemption sync point makes every host stop at the same step (it is SIGTERM-aware once jax.distributed is up);
the local flag is used as well, combined over hosts, so a signal delivered to one process stops them all.
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionWatcher:
  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._signals = signals
    self._previous: dict[int, object] = {}
    self.received: int | None = None

  def _handle(self, signum, frame) -> None:
    self.received = signum

  def __enter__(self) -> "PreemptionWatcher":
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """True on every process at the same step once any process was told to stop. Call it after every step."""
    if jax.process_count() == 1:
      return self.received is not None
    synced = False
    try:
      synced = multihost_utils.reached_preemption_sync_point(step)
    except (RuntimeError, ValueError):  # no preemption service (e.g. explicit CPU coordinator): flag only
      pass
    local = np.asarray([self.received is not None], np.int32)
    return synced or bool(np.any(multihost_utils.process_allgather(local)))
