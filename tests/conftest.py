"""Test-session settings shared by all test modules."""
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
