"""SIGTERM becomes an exception between instructions, never inside a deferred block."""

import os
import signal

import pytest

from d9d.train.stop import RunStopped, SigtermGuard, Terminated


def _deliver_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):  # the Python handler runs at one of the next instructions
        pass


def test_sigterm_raises_at_once_outside_a_deferred_block():
    before = signal.getsignal(signal.SIGTERM)
    guard = SigtermGuard()
    with guard.installed(), pytest.raises(Terminated):
        _deliver_sigterm()
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_a_deferred_block_finishes_then_raises():
    guard = SigtermGuard()
    finished = []
    with guard.installed(), pytest.raises(Terminated), guard.deferred():
        _deliver_sigterm()
        finished.append("the save")
    assert finished == ["the save"] and guard.received


def test_run_stopped_carries_the_exit_code():
    assert RunStopped("x").exit_code == 2 and RunStopped("y", 143).exit_code == 143
