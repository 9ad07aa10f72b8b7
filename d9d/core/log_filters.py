"""Scoped silencing of known, harmless console lines of the libraries d9d drives.

A clean run must not print lines a newcomer reads as errors. Each known line is dropped
where it is made (a filter on the one logger that emits it, matching its message), and
only in the situation where d9d knows it to be harmless: while d9d imports torchao, or
while it compiles its own checkpointed layers. Every other record of that logger, and
every other logger, passes untouched, so a user's own warnings still show.

The callers keep the knowledge of *why* a line is harmless next to the code that causes
it (``d9d.compile.float8``, ``d9d.compile.activation_checkpointing``, the harness's
profiler use); this module only holds the mechanism.
"""

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator


class MessageFilter(logging.Filter):
    """Drops the records whose message matches ``pattern`` (while ``when()`` holds).

    Attributes:
        pattern: A regular expression searched in the formatted message.
        when: Extra condition checked only for a matching record (``None``: always).
        dropped: How many records this filter has dropped (for tests and debugging).
    """

    def __init__(self, pattern: str, when: Callable[[], bool] | None = None):
        super().__init__()
        self.pattern = re.compile(pattern)
        self.when = when
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """``False`` (drop) for a matching record, ``True`` for every other one."""
        if not self.pattern.search(record.getMessage()):
            return True
        if self.when is not None and not self.when():
            return True
        self.dropped += 1
        return False


@contextlib.contextmanager
def dropping_log_records(logger_name: str, pattern: str) -> Iterator[MessageFilter]:
    """Drops ``logger_name``'s records matching ``pattern`` inside the block only.

    Args:
        logger_name: The logger that emits the line (e.g. ``"torchao"``).
        pattern: A regular expression searched in the record's message.

    Yields:
        The installed filter (its ``dropped`` count says what it caught).
    """
    logger = logging.getLogger(logger_name)
    message_filter = MessageFilter(pattern)
    logger.addFilter(message_filter)
    try:
        yield message_filter
    finally:
        logger.removeFilter(message_filter)


_installed: dict[tuple[str, str], MessageFilter] = {}


def install_log_filter(logger_name: str, pattern: str, when: Callable[[], bool]) -> MessageFilter:
    """Installs a lasting filter that drops matching records while ``when()`` holds.

    For lines emitted at a moment d9d does not bracket itself (during a lazy compile).
    Installing the same logger and pattern again returns the first filter.

    Args:
        logger_name: The logger that emits the line.
        pattern: A regular expression searched in the record's message.
        when: Checked for each matching record; the record is dropped only if it
            returns ``True`` (this is what keeps the filter scoped).

    Returns:
        The filter.
    """
    key = (logger_name, pattern)
    if key not in _installed:
        message_filter = MessageFilter(pattern, when)
        logging.getLogger(logger_name).addFilter(message_filter)
        _installed[key] = message_filter
    return _installed[key]


KINETO_LOG_LEVEL = "KINETO_LOG_LEVEL"
_KINETO_QUIET_LEVEL = "6"  # above every level kineto prints at (its USDT markers are 5)


def quiet_profiler_markers() -> bool:
    """Stops torch.profiler's kineto backend from printing its start/stop markers.

    Each ``torch.profiler.profile`` prints ``USDT: ... profiler_start`` and
    ``profiler_stop`` lines to stderr (kineto's tracing markers, logged at its highest
    level). Kineto reads ``KINETO_LOG_LEVEL`` once, when the first profiler starts, so
    this must run before that. The markers sit above kineto's error level, so the
    quiet level hides kineto's own error lines too (the profiler still raises on real
    failures); a value the user set, e.g. ``KINETO_LOG_LEVEL=0``, is kept.

    Returns:
        Whether this call set the variable (``False``: the user's value stands).
    """
    if KINETO_LOG_LEVEL in os.environ:
        return False
    os.environ[KINETO_LOG_LEVEL] = _KINETO_QUIET_LEVEL
    return True
