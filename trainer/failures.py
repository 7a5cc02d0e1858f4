"""Every exit is an exit: whatever escapes an entry point becomes one line on stderr and an exit code.

Loader workers ignore SIGTERM (SLURM signals every process of a task; only the trainer acts on it), so an
interpreter that exits normally after an error waits on them forever. Entry points therefore end through
``finish``: it kills the worker processes and leaves with ``os._exit``, also after success: with 2 CPU
ranks under ZeRO-3, native threads destroyed in the interpreter's teardown sometimes abort ("terminate
called without an active exception").

Exit codes: 2 for errors in what the user gave (config, data, files, a diverged run, a checkpoint that
cannot be written), 130 for Ctrl-C (SIGINT, as shells report it), 1 for anything unexpected, whose
traceback goes to ``run_dir/crash-rankN.log`` rather than the terminal.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import sys
import traceback
from pathlib import Path

INTERRUPTED_EXIT_CODE = 130


def one_line(exc: BaseException) -> str:
    """The exception's own message on one line; a loader worker's error loses torch's traceback prefix."""
    text = str(exc).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the last line is the error
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[-1] if last.startswith(type(exc).__name__) else last
    return " ".join(text.split()) or type(exc).__name__


def _user_errors() -> dict[type, str]:
    """Exception types worded for people, with the prefix of their line."""
    from data.shards import DataError
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.divergence import DivergenceError
    from trainer.safe_load import CorruptFileError, UnsafeFileError

    return {
        ConfigError: "config error",
        DataError: "data error",
        FileNotFoundError: "error",
        CheckpointError: "error",
        DivergenceError: "error",
        UnsafeFileError: "error",
        CorruptFileError: "error",
    }


def report(exc: BaseException, run_dir: str | None = None, rank: int = 0) -> int:
    """Print one line for ``exc`` and return the exit code it means."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the exit itself
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, KeyboardInterrupt):
        resume = "the same command resumes from the newest complete checkpoint"
        print(f"interrupted: stopped without saving; {resume}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    for kind, prefix in _user_errors().items():
        if isinstance(exc, kind):
            print(f"{prefix}: {one_line(exc)}", file=sys.stderr)
            return 2
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        print(f"error: No space left on device: {exc.filename or one_line(exc)}", file=sys.stderr)
        return 1
    where = _write_traceback(exc, run_dir, rank)
    print(f"error: {type(exc).__name__}: {one_line(exc)}{where}", file=sys.stderr)
    return 1


def _write_traceback(exc: BaseException, run_dir: str | None, rank: int) -> str:
    text = "".join(traceback.format_exception(exc))
    if run_dir:
        path = Path(run_dir) / f"crash-rank{rank}.log"
        try:
            path.write_text(text)
            return f" (traceback in {path})"
        except OSError:
            pass
    print(text, file=sys.stderr, end="")
    return ""


def stop_workers() -> None:
    """Kill this process's children (loader workers), which ignore SIGTERM and would outlive the exit."""
    for child in multiprocessing.active_children():
        child.kill()


def finish(code: int) -> None:
    """Leave the process now (its work is saved): workers killed, streams flushed, no interpreter teardown."""
    stop_workers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
