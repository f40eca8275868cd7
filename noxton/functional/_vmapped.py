"""How many examples a call really runs: its own batch axes times the axes that ``jax.vmap`` maps.

Under ``jax.vmap`` a function sees one example: the mapped axis is invisible in
the shapes it traces. The path that ``implementation="auto"`` takes depends on
the whole batch, so that the Equinox front end (batched with ``jax.vmap``) and
the Haiku front end (batched along leading axes) take the same path for the same
work. ``vmapped_size`` asks for the mapped axes at trace time: it binds a
``jax.custom_batching.custom_vmap`` probe on the call's arrays, whose batching
rule (run by each enclosing ``jax.vmap`` as the probe is traced, innermost first)
records that ``vmap``'s axis size and re-binds the probe for the next one out.

The probe computes nothing and its output is discarded (dead code under ``jit``);
its inputs go through ``lax.stop_gradient``, so no derivative ever reaches it
(``custom_vmap`` has no transpose rule) and gradients are those of the path run.
Limitation: a ``jax.vmap`` that batches an already traced program batches it
after the path was chosen, so its axis is not counted. That is the case for
``jax.vmap(jax.jit(f))``, and for a call inside the body of ``lax.scan``,
``lax.cond``, ``lax.while_loop`` or ``jax.checkpoint`` under an enclosing
``jax.vmap`` (those bodies are traced per example first). The usual forms,
``jax.jit(jax.vmap(f))``, ``jax.vmap`` inside ``eqx.filter_jit``, and
``jax.grad`` in either order, are counted. Choosing the path inside a
``custom_vmap`` rule instead would see those axes too, but ``custom_vmap`` has
no transpose rule: gradients would need a ``custom_vjp`` around it whose
backward recomputes the forward pass.
"""

from __future__ import annotations

import math
import threading

import jax
import jax.numpy as jnp
from jax import lax
from jax.core import Tracer

_LOCAL = threading.local()


def _nothing(*arrays):
    return jnp.zeros((), jnp.int32)


_probe = jax.custom_batching.custom_vmap(_nothing)


@_probe.def_vmap
def _record_axis(axis_size, in_batched, *arrays):
    sizes = getattr(_LOCAL, "sizes", None)
    if sizes is not None:  # None: a probe left in a traced program, batched later (see the module docstring)
        sizes.append(int(axis_size))
    # Bound again one level out, so that an enclosing jax.vmap records its axis too.
    return _probe(*arrays), False


def _as_data(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return lax.stop_gradient(x)
    return x


def vmapped_size(*arrays) -> int:
    """The product of the sizes of the ``jax.vmap`` axes that map any of ``arrays`` (1 outside ``vmap``)."""
    arrays = [x for x in arrays if x is not None]
    if not any(isinstance(x, Tracer) for x in arrays):
        return 1  # concrete arrays: no jax.vmap is mapping them
    arrays = [_as_data(x) for x in arrays]
    outer = getattr(_LOCAL, "sizes", None)
    _LOCAL.sizes = sizes = []
    try:
        _probe(*arrays)
    finally:
        _LOCAL.sizes = outer
    return math.prod(sizes)
