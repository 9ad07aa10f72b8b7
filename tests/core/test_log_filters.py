"""Known library lines are dropped at their source, and nothing else is."""

import logging
import subprocess
import sys

import pytest

from d9d.compile.activation_checkpointing import (
    CheckpointedQwen3DenseLayer,
    _compiling_a_checkpointed_layer,
    _quiet_context_fn_warning,
)
from d9d.core import log_filters
from d9d.core.log_filters import (
    MessageFilter,
    dropping_log_records,
    install_log_filter,
    quiet_profiler_markers,
)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def collected():
    handler = _Collect()
    logger = logging.getLogger("d9d.test.noisy")
    logger.addHandler(handler)
    yield logger, handler.messages
    logger.removeHandler(handler)


def test_scoped_filter_drops_only_the_pattern_and_only_inside(collected):
    logger, messages = collected
    with dropping_log_records("d9d.test.noisy", r"^Failed to load .*\.so") as dropped:
        logger.warning("Failed to load /x/_C_mxfp8.so: nope")
        logger.warning("Failed to load the user's own config")  # not a .so: kept
        logger.warning("a user's warning")
    logger.warning("Failed to load /x/_C_mxfp8.so: after the block")
    assert dropped.dropped == 1
    assert messages == [
        "Failed to load the user's own config",
        "a user's warning",
        "Failed to load /x/_C_mxfp8.so: after the block",
    ]


def test_lasting_filter_drops_only_while_its_condition_holds(collected, monkeypatch):
    logger, messages = collected
    monkeypatch.setattr(log_filters, "_installed", {})
    state = {"ours": True}
    first = install_log_filter("d9d.test.noisy", "noise", when=lambda: state["ours"])
    assert install_log_filter("d9d.test.noisy", "noise", when=lambda: False) is first
    try:
        logger.warning("noise from our code")
        state["ours"] = False
        logger.warning("noise from the user's code")
        logger.warning("something else")
    finally:
        logger.removeFilter(first)
    assert messages == ["noise from the user's code", "something else"]
    assert first.dropped == 1


def test_message_filter_formats_arguments():
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "%s is an Enum", ("E",), None)
    assert not MessageFilter(r"E is an Enum").filter(record)
    assert MessageFilter(r"^is an Enum").filter(record)


def test_profiler_markers_keep_a_value_the_user_set(monkeypatch):
    monkeypatch.setenv("KINETO_LOG_LEVEL", "0")
    assert not quiet_profiler_markers()
    assert log_filters.os.environ["KINETO_LOG_LEVEL"] == "0"
    monkeypatch.delenv("KINETO_LOG_LEVEL")
    assert quiet_profiler_markers()
    assert log_filters.os.environ["KINETO_LOG_LEVEL"] == "6"


def test_context_fn_warning_is_dropped_only_for_checkpointed_layers():
    handler = _Collect()
    logger = logging.getLogger("torch._higher_order_ops.wrap")
    logger.addHandler(handler)
    warning = "Detected that context_fn is passed to torch.utils.checkpoint under torch.compile."
    _quiet_context_fn_warning()

    class _Layer(CheckpointedQwen3DenseLayer):
        def __init__(self):  # no parameters needed: only the frame's ``self`` matters
            pass

        def compile_me(self):
            assert _compiling_a_checkpointed_layer()
            logger.warning(warning)

    try:
        _Layer().compile_me()
        assert not _compiling_a_checkpointed_layer()
        logger.warning(warning)  # a user's own checkpointed region
    finally:
        logger.removeHandler(handler)
    assert handler.messages == [warning]


def test_importing_torchao_through_d9d_prints_nothing_and_user_lines_still_show():
    # A fresh interpreter: torchao prints its lines only on the first import.
    code = (
        "import logging\n"
        "from d9d.compile.float8 import import_torchao_float8\n"
        "import_torchao_float8()\n"
        "logging.getLogger('torchao').warning('Failed to load my_own_plugin')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["Failed to load my_own_plugin"]
