"""Waiting for a multi-process launch (torchrun in its own process group) in the multi-process tests."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest


def finish(process: subprocess.Popen, what: str, timeout: float = 240) -> str:
    """The launch's output; fails the test (with the output) unless it ends with rc 0 within ``timeout`` seconds
    (a launch still running then is SIGKILLed with its whole process group: a deadlock must not hang the suite)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s (a deadlock?):\n{output[-4000:]}")
    assert process.returncode == 0, f"{what} failed (rc {process.returncode}):\n{output[-6000:]}"
    return output
