import faulthandler
import multiprocessing
import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# tiny models run fastest single-threaded, and a shared 2-core machine makes 2 threads much slower
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts single-threaded, whatever an in-process run before it set (`--train.threads`)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)

EXIT_GRACE_S = 180
"""A finished test session must also end: this long after the last test, a process still alive prints every
thread's stack and exits 1, so a leaked thread or child (or a library's exit hook that waits forever) shows up
as a red run with its cause, not as a CI job that hangs until it is killed."""


def _report_leftovers() -> None:
    """Name the non-daemon threads and child processes still alive once the tests are done: what the
    interpreter would wait for at exit."""
    threads = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    children = multiprocessing.active_children()
    if threads or children:
        print(f"tests left behind: threads {[t.name for t in threads]}, child processes "
              f"{[(p.name, p.pid, 'daemon' if p.daemon else 'non-daemon') for p in children]}",
              file=sys.__stderr__, flush=True)


def pytest_unconfigure(config):
    _report_leftovers()
    if hasattr(config, "workerinput"):  # a pytest-xdist worker lives on until the controller ends the session
        return
    faulthandler.dump_traceback_later(EXIT_GRACE_S, exit=True, file=sys.__stderr__)


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): fail a test that runs longer (pytest-timeout, or "
                                           "the fallback below)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Without pytest-timeout, `@pytest.mark.timeout(S)` still ends a hung test: after S seconds every thread's
    stack is printed and the session exits 1."""
    marker = item.get_closest_marker("timeout")
    if marker is None or item.config.pluginmanager.hasplugin("timeout"):
        yield
        return
    faulthandler.dump_traceback_later(float(marker.args[0]), exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
