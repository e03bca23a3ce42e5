"""What every variant builder needs, and results shared between builders."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxopt_lab import train
from jaxopt_lab.app.report.models import ModelPair
from jaxopt_lab.app.report.settings import JobSettings
from jaxopt_lab.app.report.training import fit_model, global_batch

Variables = Any


@dataclasses.dataclass
class JobContext:
    """Data, models, the trained teacher and the settings of one job.

    Builders may run in several threads at once; :meth:`shared` computes a result used by
    several of them (the distilled student feeds ``student_kd`` and the pipeline) once,
    the others waiting for it.
    """

    data: train.Dataset
    models: ModelPair
    teacher_variables: Variables
    settings: JobSettings
    progress: bool = False  # progress bars in fine-tunes (off when builders run in threads)
    histories: dict = dataclasses.field(default_factory=dict)  # variant -> [run_summary]
    _shared: dict = dataclasses.field(default_factory=dict, repr=False)
    _current: threading.local = dataclasses.field(default_factory=threading.local, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def x_example(self) -> np.ndarray:
        return self.data.train.x[:1]

    def steps_per_epoch(self) -> int:
        n, s = len(self.data.train.y), self.settings
        return max(1, n // global_batch(s.batch_size, n, s.devices))

    def fit(self, model, tx, *, epochs: int, **kwargs) -> Variables:
        """``fit_model`` with the job's batch size, seed and devices."""
        s = self.settings
        kwargs.setdefault("progress", self.progress)
        name = getattr(self._current, "variant", None)
        if name is not None:
            kwargs.setdefault("on_history", lambda h: self._record(name, h))
        return fit_model(model, self.data, tx, epochs=epochs, batch_size=s.batch_size,
                         seed=s.seed, devices=s.devices, **kwargs)

    def building(self, name: str | None) -> None:
        """Marks this thread as building variant ``name`` (for :attr:`histories`)."""
        self._current.variant = name

    def _record(self, name: str, summary: dict) -> None:
        with self._lock:
            self.histories.setdefault(name, []).append(summary)

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for (in any thread), then its result."""
        with self._lock:
            future = self._shared.get(key)
            owner = future is None
            if owner:
                future = self._shared[key] = concurrent.futures.Future()
        if owner:
            # Training runs inside are the shared result's, not the asking variant's.
            asking = getattr(self._current, "variant", None)
            self._current.variant = key
            try:
                future.set_result(compute())
            except BaseException as e:
                future.set_exception(e)
            finally:
                self._current.variant = asking
        return future.result()
