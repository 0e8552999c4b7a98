"""How a run stops: the stop signals, the exit codes and the errors that end training.

Exit codes of a run: 0 done; 2 configuration, data, checkpoint or run-lock error (before any heavy work, agreed by
every rank); 75 stopped by SIGTERM/SIGUSR1 after saving a complete checkpoint (the SLURM scripts requeue on it); 130
stopped by Ctrl-C (SIGINT) after saving, or at once by a second Ctrl-C; 1 anything else (including too many
non-finite steps in a row, or weights that became non-finite).
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "NonFiniteError",
    "PeerFailure",
    "StopFlag",
    "exit_code_for",
]

EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for a Ctrl-C'd program


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row, or weights that became non-finite: training cannot go on."""


class PeerFailure(RuntimeError):
    """Another rank failed its start-up checks; this rank stops with that rank's exit code."""

    def __init__(self, rank: int, code: int, message: str) -> None:
        super().__init__(f"rank {rank} failed its start-up checks (exit code {code}): {message}")
        self.code = code


class StopFlag:
    """Records SIGUSR1, SIGTERM and the first SIGINT; the loop acts on them at the next step boundary.

    A second SIGINT raises KeyboardInterrupt at once (the user insists). Handlers only set fields: saving a
    checkpoint from inside a signal handler could interrupt a collective half-way.
    """

    def __init__(self) -> None:
        self.terminate = False
        self.interrupt = False
        self.received: list[str] = []
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        """Take over SIGUSR1, SIGTERM and SIGINT (main thread only); :meth:`uninstall` gives them back."""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous.setdefault(sig, signal.signal(sig, self._terminate))
        self._previous.setdefault(signal.SIGINT, signal.signal(signal.SIGINT, self._interrupt))

    def uninstall(self) -> None:
        """Restore the handlers that :meth:`install` replaced (a trainer built inside a larger program, e.g. a test
        session or a notebook, leaves its signal handling as it found it)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _terminate(self, signum: int, frame: Any) -> None:
        self.terminate = True
        self.received.append(signal.Signals(signum).name)

    def _interrupt(self, signum: int, frame: Any) -> None:
        if self.interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt("second SIGINT: stopping without a checkpoint")
        self.interrupt = True
        self.received.append("SIGINT")


def exit_code_for(exc: BaseException) -> int:
    """2 for what the user must fix before anything runs (config, data, checkpoint choice, a held run lock), else 1."""
    from .checkpoint import CheckpointError
    from .checks import ConfigError
    from .data import DataError
    from .runlock import RunLockError

    if isinstance(exc, PeerFailure):
        return exc.code
    return 2 if isinstance(exc, (ConfigError, DataError, CheckpointError, RunLockError)) else 1
