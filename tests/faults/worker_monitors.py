"""Test-only monitor factories that hang on a marker input (imported by the spawned worker)."""

from __future__ import annotations

import os
import signal
import time

from sentinel.proxy.builtin_monitor import build_builtin

SLEEP_MARKER = 4242.0   # first input value: sleep in Python (the per-sample alarm breaks it)
BLOCK_MARKER = 4343.0   # first input value: block SIGALRM, then sleep (only the manager's watchdog helps)
EXIT_MARKER = 4444.0    # first input value: end the process at once (as a segfault in a C extension would)


class _Hanging:
    """The built-in monitor, except on marker inputs."""

    def __init__(self, inner):
        self.inner = inner

    def observe(self, batch):
        first = float(batch.inputs.flat[0]) if batch.inputs is not None and batch.inputs.size else None
        if first == SLEEP_MARKER:
            time.sleep(3600)
        if first == EXIT_MARKER:
            os._exit(3)
        if first == BLOCK_MARKER:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(3600)
        return self.inner.observe(batch)

    def status(self) -> dict:
        return self.inner.status()


def hanging(config, model_config):
    return _Hanging(build_builtin(config, model_config))
