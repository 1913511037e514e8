"""Test-session settings shared by all test modules."""
import resource
import time

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled executables after each module. A long slow-test session loads thousands
    of XLA:CPU programs; with jaxlib 0.10 a compilation late in such a process failed and the
    C++ unwinder then crashed on stale JIT frames (SIGSEGV in _Unwind_Find_FDE), which did not
    happen with the executables of finished modules released."""
    yield
    jax.clear_caches()


# ----------------------------------------------------------------------------- CPU-time report
# Wall-clock durations mean little on a loaded machine; CPU seconds (this process's threads plus
# the subprocesses a test waited for) do not depend on the load, and bound the wall time the test
# takes alone on an idle machine from above as long as it uses at least one core's worth of
# threads. ``pytest --cpu-times=20`` lists the 20 most expensive tests and the session's total.
def pytest_addoption(parser):
    parser.addoption("--cpu-times", type=int, default=0, metavar="N",
                     help="report the N tests with the most CPU seconds (setup + call + teardown).")


_CPU = {}


def _cpu_seconds():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t, w = _cpu_seconds(), time.time()
    yield
    _CPU[item.nodeid] = (_cpu_seconds() - t, time.time() - w)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.getoption("--cpu-times")
    if not n or not _CPU:
        return
    rows = sorted(_CPU.items(), key=lambda kv: -kv[1][0])
    tr = terminalreporter
    tr.write_sep("=", f"CPU seconds per test (top {n} of {len(rows)})")
    for nodeid, (cpu, wall) in rows[:n]:
        tr.write_line(f"{cpu:8.1f} cpu-s {wall:8.1f} wall-s  {nodeid}")
    tot = sum(c for c, _ in _CPU.values())
    tr.write_line(f"total: {tot:.1f} cpu-s over {len(rows)} tests "
                  f"(wall {sum(w for _, w in _CPU.values()):.1f} s)")
