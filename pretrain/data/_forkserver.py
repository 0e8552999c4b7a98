"""Imported only by multiprocessing's forkserver process (a preload module set by
:func:`pretrain.data.loader.worker_context`); never import it elsewhere.

The forkserver sits in the trainer's process group, so SLURM's SIGTERM/SIGUSR1 reach it too; the workers it forks
are its children, and a DataLoader worker whose parent died stops. So the server ignores those signals, and every
process it forks gets the default dispositions back at once (a pool that terminates its workers with SIGTERM must
still be able to); DataLoader workers then ignore them in their own init. Importing the data package here also means
forked workers start with torch and the loaders already imported.
"""

from __future__ import annotations

import os
import signal

from . import loader  # noqa: F401 - preloaded for the workers

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

for _sig in _SIGNALS:
    signal.signal(_sig, signal.SIG_IGN)


def _restore_defaults() -> None:
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


os.register_at_fork(after_in_child=_restore_defaults)
