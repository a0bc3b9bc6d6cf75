"""Stopping a job cleanly: SIGTERM and SIGUSR1 set a flag that the trainer acts on at the next step boundary.

    stop = StopSignal().install()      # first thing in main(): a signal during start-up is not fatal either
    ...
    if stop.received: ...              # the trainer agrees on it across ranks, saves a checkpoint, stops
    return stop.exit_code              # 143 after SIGTERM, 138 after SIGUSR1 (slurm/train_egmf.sh requeues)
"""

from __future__ import annotations

import signal


class StopSignal:
    """Remembers SIGTERM (scancel, the launcher stopping the job) and SIGUSR1 (Slurm's warning before the time
    limit). The handler only sets a flag: a rank may be inside a collective, where a Python exception could not
    be raised anyway. The trainer checks the flag at each step boundary, agrees on it across ranks, saves a
    checkpoint and stops."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self.previous = {}

    @property
    def received(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)  # what a shell reports for a process the signal ended

    def __call__(self, signum, frame):
        self.signum = self.signum or signum

    def install(self) -> StopSignal:
        self.previous = {signum: signal.signal(signum, self) for signum in self.SIGNALS}
        return self

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
