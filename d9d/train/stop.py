"""How a run stops early: a one-line reason and an exit code, and SIGTERM.

``RunStopped`` is what the loop raises for a stop the user can act on (non-finite
gradient norms, a failed save, SIGTERM); ``python -m d9d.train`` prints its message on
one line and exits with its code (2, like a config error; 143 for SIGTERM, the shell's
128 + 15).

``terminate_on_sigterm`` turns SIGTERM (what schedulers and ``torchrun`` send before a
kill) into ``Terminated`` at the next Python instruction of the main thread, so the loop
can finish or abandon a background save before exiting. While ``deferred()`` is active
(a synchronous save on the main thread), the exception waits until the block ends, so a
save is never cut in half by it.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator


class RunStopped(RuntimeError):
    """The run stopped early for a reason stated in one line.

    Attributes:
        exit_code: What ``python -m d9d.train`` exits with.
    """

    def __init__(self, message: str, exit_code: int = 2):
        """Records the reason and the exit code."""
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM arrived (a ``BaseException``, so that ``except Exception`` lets it pass)."""


class SigtermGuard:
    """Raises ``Terminated`` in the main thread on SIGTERM, except inside ``deferred()``."""

    def __init__(self):
        """Nothing is installed until :meth:`installed` is entered."""
        self.received = False
        self._deferring = 0

    def _handler(self, signum, frame) -> None:
        self.received = True
        if not self._deferring:
            raise Terminated()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that SIGTERM does not interrupt; it raises when the block ends."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self.received and not self._deferring:
            raise Terminated()

    @contextlib.contextmanager
    def installed(self) -> Iterator["SigtermGuard"]:
        """Installs the handler for the block (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
