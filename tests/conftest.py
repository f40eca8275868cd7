import contextlib
import os
import warnings

import jax
import pytest

# Eight CPU devices for the multi-device tests (tests/test_sharding.py), set before JAX starts its
# backend: jax_num_cpu_devices where this JAX has it, the XLA flag on the older ones (0.4.38).
# Everything else runs on the first device, as it would with one.
try:
    jax.config.update("jax_num_cpu_devices", 8)
except AttributeError:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# Strictness as in Equinox's own test-suite: no implicit dtype promotion, no
# implicit rank promotion, so that nothing in noxton broadcasts silently.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@contextlib.contextmanager
def _setting(config, name, value):
    """``config``'s option ``name`` set to ``value`` for a block, then restored (JAX's or jaxtyping's config)."""
    before = getattr(config, name)
    config.update(name, value)
    try:
        yield
    finally:
        config.update(name, before)


@pytest.fixture
def x64():
    """Enable float64 for one test, then restore the previous setting."""
    with _setting(jax.config, "jax_enable_x64", True):
        yield


warnings.filterwarnings("ignore", message=".*jax.*deprecated.*", category=DeprecationWarning)


# Hypothesis profiles for the property-based suites (tests/test_hypothesis_parity.py).
# "ci" is the default: 150 derandomised examples (the same ones on every run, so a
# failure reproduces), no deadline (the first example of a shape compiles). "smoke"
# (40) is for the older-JAX tox envs, "long" for long runs: --hypothesis-profile=long.
from hypothesis import HealthCheck as _HealthCheck  # noqa: E402
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_common = dict(
    deadline=None, print_blob=True, suppress_health_check=[_HealthCheck.too_slow, _HealthCheck.data_too_large]
)
_hypothesis_settings.register_profile("ci", max_examples=150, derandomize=True, **_common)
_hypothesis_settings.register_profile("smoke", max_examples=40, derandomize=True, **_common)  # older-JAX tox envs
_hypothesis_settings.register_profile("long", max_examples=5000, **_common)


def pytest_addoption(parser):
    parser.addoption(
        "--cross-product-sample",
        type=int,
        default=1,
        metavar="K",
        help="run every K-th case of the tests marked cross_product (1, the default: all of them)",
    )


def pytest_configure(config):
    # The hypothesis plugin loads the profile named by --hypothesis-profile; without one, "ci".
    if not config.getoption("hypothesis_profile", None):
        _hypothesis_settings.load_profile("ci")
    config.addinivalue_line(
        "markers", "cross_product: one case of a full cross-product of options (see --cross-product-sample)"
    )
    config.addinivalue_line(
        "markers",
        "own_errors: asserts noxton's own error messages, so runs without jaxtyping's run-time checks (see _typecheck)",
    )


@pytest.fixture(autouse=True)
def _typecheck(request):
    """The suite runs with jaxtyping's run-time checks of noxton's annotations (``--jaxtyping-packages``
    in setup.cfg), as Equinox's does. A test marked ``own_errors`` feeds noxton bad input on purpose
    and asserts the message that users, who run without a type checker, get from noxton's own checks:
    for it the run-time checks are off, where they would answer first with the annotation's verdict."""
    if request.node.get_closest_marker("own_errors") is None:
        yield
        return
    import jaxtyping

    with _setting(jaxtyping.config, "jaxtyping_disable", True):
        yield


def pytest_collection_modifyitems(config, items):
    """With ``--cross-product-sample=K``, keep every K-th ``cross_product`` case, by sorted test id.

    The tox envs for the older JAX versions use it: the full cross-product against
    torch runs once, on the newest JAX that has torch, and a fixed, evenly spread
    sample of it runs on the others.
    """
    k = config.getoption("cross_product_sample")
    if k <= 1:
        return
    marked = sorted(item.nodeid for item in items if item.get_closest_marker("cross_product"))
    keep = set(marked[::k])
    selected, dropped = [], []
    for item in items:
        sampled_out = item.get_closest_marker("cross_product") and item.nodeid not in keep
        (dropped if sampled_out else selected).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = selected
