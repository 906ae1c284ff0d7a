"""How a training process ends: stop requests, fatal errors, and the teardown that lets it exit.

Every way out ends the process within a bounded time:

* Stop request (SIGTERM, SIGUSR1, SIGUSR2: ``scancel``, SLURM's pre-timeout and preemption signals,
  ``timeout``). :class:`StopRequest` only records it; the training loop reads it at the next step
  boundary, saves a checkpoint and returns. A SIGTERM or SIGINT after that ends the process at once. A
  request the loop does not read within ``DINOSCALE_STOP_TIMEOUT`` seconds (a data read or a collective that
  never returns) ends the process too.
* Fatal error. :func:`fatal_error` prints the traceback and one line naming the cause, tears the run down
  (:func:`teardown`) and returns the exit code; if the process still has not exited a minute later (a thread
  or a process group that does not let go), the watchdog ends it.

Why the teardown: the DataLoader workers ignore the stop signals (they are sent to the whole process group,
and a worker killed by one would crash the trainer before it saves), so multiprocessing's exit handler, which
ends daemonic children with SIGTERM and then joins them without a timeout, waits forever for any worker still
alive at exit. Workers are still alive at exit when the exception that ended the run still references the
frames holding the loader: Python keeps an uncaught exception in ``sys.last_traceback`` until after the exit
handlers, and torch's own worker shutdown does nothing once the interpreter is exiting. :func:`teardown`
releases those frames while the interpreter is fully alive, so the loader shuts its workers down the normal
way, and kills whatever child process is left after a bounded wait.

Nothing here imports torch: ``tools/submit.py`` imports it through :mod:`dinoscale.launch`.
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from types import FrameType

log = logging.getLogger("dinoscale")

#: Signals that mean "save and stop at the next step boundary": SLURM's pre-timeout/preemption signals
#: (sbatch --signal=USR1@90, submitit's USR2) and the SIGTERM that scancel/preemption/timeout send first.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

# After a stop request, these end the process at once ("stop now"); a repeated USR1/USR2 is only a notice.
_EXIT_AT_ONCE_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: Environment variable: seconds a stop request may wait for the loop to reach a step boundary.
STOP_TIMEOUT_ENV = "DINOSCALE_STOP_TIMEOUT"
# Multi-process runs read the request only at log steps (train.log_every steps apart): room for those.
DEFAULT_STOP_TIMEOUT_S = 300.0
#: Seconds from a fatal error to the end of the process (teardown, process group, interpreter exit).
EXIT_TIMEOUT_S = 60.0
# Bounded waits inside the teardown, well inside EXIT_TIMEOUT_S.
_CHILD_JOIN_S = 10.0
_THREAD_JOIN_S = 10.0


def stop_timeout_s() -> float:
    value = os.environ.get(STOP_TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_STOP_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{STOP_TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None


def exit_now(message: str, code: int, *, stacks: bool = False) -> None:
    """End the process at once: the message (and every thread's stack), child processes killed, no cleanup."""
    # os.write, not logging or print: the thread that is stuck may hold their locks.
    os.write(2, f"dinoscale: {message}\n".encode())
    if stacks:  # where the process was stuck
        faulthandler.dump_traceback(file=2, all_threads=True)
    _kill_child_processes()
    os._exit(code)


def _kill_child_processes() -> None:
    for child in multiprocessing.active_children():
        child.kill()  # SIGKILL: loader workers ignore SIGTERM


class _Watchdog:
    """One daemon thread that ends the process when a deadline passes.

    Arming it only assigns an attribute (no lock, no thread start), so a signal handler may do it at any
    point of the code it interrupts. It works while the main thread is blocked in C code, where Python runs
    no signal handlers.
    """

    def __init__(self) -> None:
        self._deadline: tuple[float, str, int] | None = None  # (time.monotonic(), message, exit code)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="dinoscale-watchdog", daemon=True)
            self._thread.start()

    def arm(self, seconds: float, message: str, code: int) -> None:
        self._deadline = (time.monotonic() + seconds, message, code)

    def disarm(self) -> None:
        self._deadline = None

    def _run(self) -> None:
        while True:
            time.sleep(0.2)
            deadline = self._deadline
            if deadline is not None and time.monotonic() >= deadline[0]:
                exit_now(deadline[1], deadline[2], stacks=True)


_WATCHDOG = _Watchdog()


class StopRequest:
    """A stop flag set by a signal; the training loop reads it once per step (``stop_requested=``).

    The handler only records the signal (and arms the watchdog), which is safe at any point of the
    interrupted code; agreeing across ranks and saving happen at the next step boundary, when the loop
    calls this object. A SIGTERM or SIGINT after the first signal ends the process at once, without a
    checkpoint. SIGINT keeps its usual meaning (KeyboardInterrupt) the first time.
    """

    def __init__(self, timeout_s: float | None = None) -> None:
        self.signum: int | None = None
        self.timeout_s = stop_timeout_s() if timeout_s is None else timeout_s
        self._read = False

    def __call__(self) -> bool:
        if self.signum is None:
            return False
        if not self._read:  # the loop is at a step boundary: it saves and returns; no deadline on that
            self._read = True
            _WATCHDOG.disarm()
        return True

    def handler(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if signum in _EXIT_AT_ONCE_SIGNALS:
                exit_now(f"received {name} while stopping on {signal.Signals(self.signum).name}: exiting at once, "
                         "without a checkpoint", 128 + signum)
            return  # a repeated checkpoint notice (USR1/USR2): already stopping
        self.signum = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("received %s: will checkpoint and stop at the next step boundary (SIGTERM or SIGINT now exits "
                    "at once; without a step boundary within %g s the process exits)", name, self.timeout_s)
        _WATCHDOG.arm(self.timeout_s, f"received {name} {self.timeout_s:g} s ago but the training loop did not reach "
                      "a step boundary (a data read or collective that does not return?); exiting without a "
                      f"checkpoint ({STOP_TIMEOUT_ENV} sets this bound)", 128 + signum)

    def install(self, signum: int) -> object:
        """Route ``signum`` to this request; returns the handler it replaces."""
        _WATCHDOG.start()
        previous = signal.getsignal(signum)
        signal.signal(signum, self.handler)
        return previous


def install_stop_handler() -> StopRequest:
    """A :class:`StopRequest` receiving STOP_SIGNALS and SIGINT."""
    stop = StopRequest()
    for signum in (*STOP_SIGNALS, signal.SIGINT):
        stop.install(signum)
    return stop


def describe(exc: BaseException) -> str:
    """One line naming the cause of ``exc`` (torch wraps an error in a DataLoader worker in a traceback)."""
    text = str(exc).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        return f"{text.splitlines()[-1]} (in a data loader worker)"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _release_frames(exc: BaseException) -> None:
    """Drop the local variables of every finished frame the exception (and its causes) references."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)  # skips frames still executing
        exc = exc.__cause__ or exc.__context__


def teardown(exc: BaseException) -> None:
    """Release what a failed run holds so that the process can exit, and bound the time left to exit.

    The frames of the failed run are cleared (the loader then stops its workers, writers close their files);
    child processes still alive after a bounded wait are killed; non-daemon threads get a bounded wait. From
    here on the process has :data:`EXIT_TIMEOUT_S` seconds to exit before the watchdog ends it.
    """
    _WATCHDOG.start()
    _WATCHDOG.arm(EXIT_TIMEOUT_S, f"the process did not exit within {EXIT_TIMEOUT_S:g} s of a fatal error "
                  f"({describe(exc)})", 1)
    _release_frames(exc)
    gc.collect()  # the loader and its DataLoader iterator sit in reference cycles

    deadline = time.monotonic() + _CHILD_JOIN_S
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            log.warning("child process %s (pid %d) did not exit; killing it", child.name, child.pid)
            child.kill()
            child.join(1.0)

    deadline = time.monotonic() + _THREAD_JOIN_S
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("thread %r is still running; the process exits anyway within %g s", thread.name,
                        EXIT_TIMEOUT_S)


def fatal_error(exc: BaseException) -> int:
    """Report ``exc`` (traceback, then one line naming the cause), tear down; returns the exit code.

    Call it from a process's entry point: it leaves the watchdog armed to end the process.
    """
    traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.flush()
    teardown(exc)
    log.error("training failed: %s", describe(exc))
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 1
