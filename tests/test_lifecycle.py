"""dinoscale.lifecycle: stop requests, the watchdog and the teardown after a fatal error.

The process-ending behaviour is checked in small subprocesses (a few seconds each); tests/chaos/ does the same
with tools/train.py itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dinoscale import lifecycle


def test_stop_request_is_set_by_the_signal_and_nothing_else():
    flag = lifecycle.StopRequest(timeout_s=600)
    previous = flag.install(signal.SIGUSR2)
    try:
        assert flag() is False
        os.kill(os.getpid(), signal.SIGUSR2)
        for _ in range(100):  # Python runs the handler at the next bytecode boundary
            if flag():
                break
            time.sleep(0.01)
        assert flag() is True and flag.signum == signal.SIGUSR2
    finally:
        signal.signal(signal.SIGUSR2, previous)
        lifecycle._WATCHDOG.disarm()


def test_describe_names_the_original_error_of_a_loader_worker():
    wrapped = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File \"x.py\", line 1\nRuntimeError: none of the 3 image files under /d "
                           "could be read")
    assert lifecycle.describe(wrapped) == ("RuntimeError: none of the 3 image files under /d could be read "
                                           "(in a data loader worker)")
    assert lifecycle.describe(OSError(28, "No space left on device", "/out/m.jsonl")) == (
        "OSError: [Errno 28] No space left on device: '/out/m.jsonl'")
    assert lifecycle.describe(KeyboardInterrupt()) == "interrupted (SIGINT)"


def start(script: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})


def wait_for_line(proc: subprocess.Popen, text: str) -> None:
    for line in proc.stdout:
        if text in line:
            return
    pytest.fail(f"the subprocess ended (rc={proc.wait()}) before printing {text!r}")


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the process did not end within {timeout} s:\n{out}")
    return proc.returncode, out, time.monotonic() - start


STUCK = """
    import logging, sys, time
    from dinoscale import lifecycle
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    stop = lifecycle.install_stop_handler()
    print("stuck", flush=True)
    while True:  # a step that never ends, so the loop never reads the request
        time.sleep(0.05)
"""


def test_a_stop_request_the_loop_cannot_reach_ends_the_process_after_the_timeout():
    proc = start(STUCK, DINOSCALE_STOP_TIMEOUT="2")
    wait_for_line(proc, "stuck")
    proc.send_signal(signal.SIGTERM)
    rc, out, seconds = finish(proc, timeout=30)
    assert rc == 128 + signal.SIGTERM, out
    assert "did not reach a step boundary" in out and 1.5 < seconds < 10, (seconds, out)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_sigterm_or_sigint_ends_the_process_at_once(second):
    proc = start(STUCK, DINOSCALE_STOP_TIMEOUT="600")
    wait_for_line(proc, "stuck")
    proc.send_signal(signal.SIGUSR1)
    wait_for_line(proc, "will checkpoint and stop")
    proc.send_signal(signal.SIGUSR1)  # a repeated checkpoint notice is not "stop now"
    time.sleep(1)
    assert proc.poll() is None
    proc.send_signal(second)
    rc, out, seconds = finish(proc, timeout=30)
    assert rc == 128 + second and "exiting at once" in out and seconds < 5, (rc, seconds, out)


def test_fatal_error_lets_a_process_with_loader_workers_exit():
    # The hang this module fixes: workers that ignore SIGTERM (as dinoscale's loader's do) outlive the failed
    # run because the exception keeps the loader alive, and multiprocessing's exit handler joins them forever.
    script = """
        import signal, sys
        from torch.utils.data import DataLoader, Dataset
        from dinoscale import lifecycle

        class Broken(Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                raise RuntimeError("none of the 4 image files under /nowhere could be read")

        def ignore_stop_signals(_):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

        def train():
            batches = iter(DataLoader(Broken(), num_workers=1, worker_init_fn=ignore_stop_signals))
            next(batches)

        try:
            train()
        except BaseException as exc:
            sys.exit(lifecycle.fatal_error(exc))
    """
    rc, out, seconds = finish(start(script), timeout=60)
    assert rc == 1 and seconds < 30, (rc, seconds, out)
    assert "training failed: RuntimeError: none of the 4 image files under /nowhere could be read" in out, out
    assert "killing it" not in out, out  # the loader stopped its worker itself once its frame was released
