"""Ctrl-C during `sentinel replay`: the partial report, exit 130, never a hang.

The replay runs in a child process of its own session, so the SIGINT goes to it alone, with
SIGINT put back to Python's handler inside the child (a test runner started from a script's
background job inherits SIGINT ignored, and a replay started so rightly ignores it). The
child has a hard timeout and is killed on failure (its stacks in the message): this test
cannot hang the suite. Check it as CI runs it, from a background job with SIGINT ignored:
    setsid bash -c 'trap "" INT; python -m pytest -n 2 tests/replay/test_replay_interrupt.py & wait'
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from servers import REPO

# Python's own SIGINT handler, whatever this process inherited, then `python -m sentinel ARGS`.
# SIGUSR1 dumps the child's stacks (faulthandler), for the message when it does not stop.
CHILD = ("import faulthandler, runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
         "faulthandler.register(signal.SIGUSR1); "
         "sys.argv = ['sentinel', *sys.argv[1:]]; runpy.run_module('sentinel', run_name='__main__', alter_sys=True)")


def test_ctrl_c_ends_a_replay_with_the_partial_report_and_exit_130(tmp_path):
    out = tmp_path / "r.json"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(128)          # connects complete; nobody reads or answers
        silent.settimeout(0.2)
        port = silent.getsockname()[1]
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, "replay", "--model", "v3", "--target", f"http://127.0.0.1:{port}",
             "--rate", "50", "--count", "10000", "--timeout", "60", "--json", str(out)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        accepted: list[socket.socket] = []
        try:
            deadline = time.monotonic() + 60
            while len(accepted) < 4 and time.monotonic() < deadline and child.poll() is None:
                try:
                    accepted.append(silent.accept()[0])   # the probe, then requests in flight
                except TimeoutError:
                    pass
            assert len(accepted) >= 4, (child.poll(), child.stderr.read() if child.poll() is not None else "")
            t0 = time.monotonic()
            os.kill(child.pid, signal.SIGINT)
            try:
                stdout, stderr = child.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(child.pid, signal.SIGUSR1)
                time.sleep(1)
                os.killpg(child.pid, signal.SIGKILL)
                stdout, stderr = child.communicate(timeout=10)
                raise AssertionError(f"replay still running 30 s after SIGINT:\n{stderr}") from None
            took = time.monotonic() - t0
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=10)
            for c in accepted:
                c.close()
    assert child.returncode == 130, stderr + stdout
    assert took < 20, took           # not the 60 s request timeout, not the 200 s plan
    d = json.loads(out.read_text())
    # Nothing was answered; the requests in flight are abandoned, not counted as sent or failed.
    assert d["interrupted"] is True and d["passed"] is False
    assert d["abandoned"] >= 3 and d["sent"] == d["errors"] == d["answered"] == 0
    assert "INTERRUPTED after" in stdout and "abandoned" in stdout
    assert "replay interrupted" in stderr and "Traceback" not in stderr
