"""Preemption: stop at a step boundary with a checkpoint when the scheduler asks, so a requeued job resumes.

SLURM asks a job to stop with SIGTERM (preemption, ``scancel``) or with a signal sent ahead of the time limit
(``sbatch --signal=B:USR1@120``, which the templates in ``launch/slurm/`` forward to the ranks). The handler
only records the signal; at the next step boundary the ranks agree through one all-reduce (a signal may
reach them at different steps), every rank saves the checkpoint, and the run exits with
``PREEMPTED_EXIT_CODE`` so the batch script knows to requeue it.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

from trainer.distributed import all_reduce_sum

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    """Records STOP_SIGNALS while installed; ``requested`` is collective and agrees on every rank."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        self.received = signum

    def requested(self, device: torch.device) -> bool:
        """True on every rank once any rank has received a stop signal (one all-reduce)."""
        votes = all_reduce_sum([float(self.received is not None)], device)[0]
        if votes and self.received is not None:
            log.warning("received %s: checkpointing and stopping", signal.Signals(self.received).name)
        return votes > 0


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """For data-loader workers: SLURM signals every process of a task, and Ctrl-C the whole process group;
    only the trainer acts on them, and kills its workers when it exits (``trainer.failures.finish``)."""
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
