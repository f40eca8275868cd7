"""``import noxton`` sets glibc's malloc thresholds and top padding (``noxton._malloc``), and leaves the user's choice
alone."""

import os
import subprocess
import sys

import jax
import pytest

from noxton import _malloc

# Where glibc puts a 16 MiB block after ``import noxton``: in the main heap (below the 32 MiB mmap
# threshold noxton sets) or a fresh mmap (glibc's own 128 KiB threshold in a fresh process).
PROBE = """
import ctypes
import noxton
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(16 << 20)
heap = [line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
lo, hi = (int(v, 16) for v in heap[0].split()[0].split("-")) if heap else (0, 0)
print("heap" if lo <= p < hi else "mmap")
"""


# A thread allocates three 24 MiB blocks: the third does not fit in its arena's first heap (64 MiB) and takes
# a heap of its own. The main thread frees it, as Python frees a jitted call's result that a worker thread of
# XLA allocated: is that heap still mapped, for the next call's block, or unmapped (faulted in again next time)?
HEAP_PROBE = """
import ctypes
import threading
import noxton
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = []
thread = threading.Thread(target=lambda: blocks.extend(libc.malloc(24 << 20) for _ in range(3)))
thread.start()
thread.join()
libc.free(blocks[-1])
maps = [[int(v, 16) for v in line.split()[0].split("-")] for line in open("/proc/self/maps")]
print("kept" if any(lo <= blocks[-1] < hi for lo, hi in maps) else "unmapped")
"""


def _probe(probe=PROBE, **env):
    # this process's own settings left out: XLA_FLAGS holds the cap since it imported noxton
    unset = (*_malloc.USER_SETTINGS, "NOXTON_KEEP_MALLOC", "GLIBC_TUNABLES", "XLA_FLAGS")
    base = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run(
        [sys.executable, "-c", probe], env={**base, **env}, capture_output=True, text=True, check=True, timeout=300
    )
    return out.stdout.strip()


@pytest.mark.skipif(_malloc._glibc() is None, reason="glibc only")
def test_import_raises_the_mmap_threshold():
    assert _probe() == "heap"
    assert _probe(NOXTON_KEEP_MALLOC="1") == "mmap"
    assert _probe(MALLOC_TRIM_THRESHOLD_="131072") == "mmap"


@pytest.mark.skipif(_malloc._glibc() is None, reason="glibc only")
def test_import_keeps_a_thread_heap_that_another_thread_emptied():
    assert _probe(HEAP_PROBE) == "kept"
    # noxton's two thresholds alone, set by the user, with glibc's own top padding: the heap goes
    thresholds = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
    assert _probe(HEAP_PROBE, **thresholds) == "unmapped"


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


@pytest.mark.parametrize(
    ("environ", "tuned"),
    [
        ({}, True),
        ({"NOXTON_KEEP_MALLOC": "0"}, True),
        ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, True),
        ({"NOXTON_KEEP_MALLOC": "1"}, False),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, False),
        ({"MALLOC_TOP_PAD_": "0"}, False),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, False),
    ],
)
def test_tune_malloc_respects_the_environment(environ, tuned):
    libc = FakeLibc()
    assert _malloc.tune_malloc(environ, libc) is tuned
    expected = [
        (_malloc.M_MMAP_THRESHOLD, 32 * 2**20),
        (_malloc.M_TRIM_THRESHOLD, 64 * 2**20),
        (_malloc.M_TOP_PAD, 64 * 2**20),
    ]
    assert libc.calls == (expected if tuned else [])


# The layer's forward at B=8, L=512, E=512, whose intermediates XLA packs into 40 MiB of temporaries (above glibc's
# largest mmap threshold): minor page faults per call after two warm-up calls, median of five.
FAULTS_PROBE = """
import os
import resource
import statistics
import jax
import equinox as eqx
import noxton
from noxton.nn import MultiheadAttention
print("XLA_FLAGS=" + os.environ.get("XLA_FLAGS", ""))
m = MultiheadAttention(512, 8, key=jax.random.PRNGKey(0))
x = jax.random.normal(jax.random.PRNGKey(1), (8, 512, 512))
f = eqx.filter_jit(lambda m, x: jax.vmap(lambda xi: m(xi, xi, xi, need_weights=False)[0])(x))
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(m, x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[2:]))
"""


@pytest.mark.skipif(_malloc._glibc() is None, reason="glibc only")
def test_import_caps_xla_temporaries_below_the_mmap_threshold():
    # Without the cap, about two processes in three fault the 40 MiB in on every call (10240 pages; measured
    # with XLA_FLAGS=--xla_multiheap_size_constraint_per_heap=-1: 10242, 0, 10241, 10241, 2048, 11022). With it,
    # 0 or 1 in 24 of 25 processes, and once (beside another xdist worker) 4096: a 16 MiB piece, not the whole.
    for _ in range(2):
        flags, faults = _probe(FAULTS_PROBE, JAX_PLATFORMS="cpu").splitlines()
        assert f"--{_malloc.TEMP_FLAG}={_malloc.TEMP_CAP}" in flags
        assert float(faults) < 5000
    flags, _ = _probe(FAULTS_PROBE, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--{_malloc.TEMP_FLAG}=-1").splitlines()
    assert flags == f"XLA_FLAGS=--{_malloc.TEMP_FLAG}=-1"  # the user's setting, left alone
    flags, _ = _probe(FAULTS_PROBE, JAX_PLATFORMS="cpu", NOXTON_KEEP_MALLOC="1").splitlines()
    assert flags == "XLA_FLAGS="


@pytest.mark.parametrize(
    ("environ", "capped"),
    [
        ({}, True),
        ({"JAX_PLATFORMS": "cpu"}, True),
        ({"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}, True),
        ({"JAX_PLATFORMS": "cuda,cpu"}, False),
        ({"JAX_PLATFORMS": "tpu"}, False),
        ({"XLA_FLAGS": f"--{_malloc.TEMP_FLAG}=1048576"}, False),
    ],
)
def test_cap_xla_temporaries_respects_the_environment(monkeypatch, environ, capped):
    monkeypatch.setattr(_malloc, "_backend_started", lambda: False)
    monkeypatch.setattr(_malloc, "_accelerator_plugins", lambda: False)
    before = environ.get("XLA_FLAGS", "")
    environ = dict(environ)
    assert _malloc.cap_xla_temporaries(environ) is capped
    cap = f"--{_malloc.TEMP_FLAG}={_malloc.TEMP_CAP}"
    assert environ.get("XLA_FLAGS", "") == (f"{before} {cap}".strip() if capped else before)


@pytest.mark.parametrize(
    ("version", "takes"), [("0.4.38", True), ("0.10.2", True), ("0.12.0.1", True), ("0.13.0", False), ("1.0", False)]
)
def test_the_cap_waits_for_a_jaxlib_known_to_take_the_flag(monkeypatch, version, takes):
    assert _malloc._jaxlib_takes_the_flag(version) is takes
    monkeypatch.setattr(_malloc, "_jaxlib_takes_the_flag", lambda: takes)
    monkeypatch.setattr(_malloc, "_backend_started", lambda: False)
    assert _malloc.cap_xla_temporaries({"JAX_PLATFORMS": "cpu"}) is takes


def test_cap_xla_temporaries_waits_for_no_started_backend_and_no_accelerator(monkeypatch):
    monkeypatch.setattr(_malloc, "_accelerator_plugins", lambda: False)
    jax.numpy.zeros(1).block_until_ready()
    assert _malloc._backend_started()  # this process has computed: too late for XLA's flags
    assert _malloc.cap_xla_temporaries({"JAX_PLATFORMS": "cpu"}) is False
    monkeypatch.setattr(_malloc, "_backend_started", lambda: False)
    monkeypatch.setattr(_malloc, "_accelerator_plugins", lambda: True)
    assert _malloc.cap_xla_temporaries({"JAX_PLATFORMS": ""}) is False  # no platform asked for: JAX's default
    assert _malloc.cap_xla_temporaries({"JAX_PLATFORMS": "cpu"}) is True
