"""The contenders: each builds, for a shape ``(B, L, E, H)`` and a mode, a call that runs to completion.

Modes: ``"fwd"`` (need_weights=False), ``"fwd_w"`` (need_weights=True), ``"fwd_bwd"`` (forward and
backward of ``<output, R>`` for a fixed random ``R``, with respect to the inputs and every parameter).
Each JAX contender is a pure forward function and its arguments; :func:`jax_call` jits it, or its
gradient, the same way for all of them. torch runs in eval + ``no_grad`` for the forward modes and
in train mode for forward+backward.

They run on the default device of each library: JAX's default backend, and CUDA for torch when it
has a GPU (:func:`torch_device`); each call waits for its device (``block_until_ready``,
``torch.cuda.synchronize``). ``DTYPE`` (``"float32"`` or ``"bfloat16"``, set by ``--dtype``) is the
dtype of every input and parameter.

On a GPU, float32 runs in full float32 in both libraries, the arithmetic torch's float32 results (and
noxton's parity with them) stand for: JAX's default there multiplies float32 matrices in TensorFloat-32,
so every JAX contender is compiled under ``jax.default_matmul_precision("highest")``
(:func:`matmul_precision`), and torch's matrix products and cuDNN convolutions are kept off TF32
(:func:`torch_device`). bfloat16 runs at each library's default.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

THREADS = os.cpu_count() or 1  # XLA's CPU client uses every core; torch is given as many threads
DTYPES = ("float32", "bfloat16")
DTYPE = "float32"  # of every input and parameter; set by --dtype


def torch_device() -> str:
    """``"cuda"`` where torch sees a GPU (with TF32 off: float32 is full float32), else ``"cpu"``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's default, stated
    torch.backends.cudnn.allow_tf32 = False  # on by default: the squeeze-excitation block's 1x1 convolutions
    return "cuda"


def matmul_precision(dtype: str | None = None) -> str | None:
    """The matmul precision JAX contenders on ``dtype`` (``DTYPE``) inputs compile under: ``"highest"`` for
    float32 off the CPU, else the default."""
    import jax

    return "highest" if (dtype or DTYPE) == "float32" and jax.default_backend() != "cpu" else None


def precision_scope(dtype: str | None = None) -> contextlib.AbstractContextManager:
    """``jax.default_matmul_precision`` at :func:`matmul_precision` (nothing where that is the default): the scope
    in which JAX contenders on ``dtype`` (``DTYPE``) inputs are traced and compiled."""
    import jax

    precision = matmul_precision(dtype)
    return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


def on_device(f: Callable[..., Any], dtype: str | None = None) -> Callable[..., Any]:
    """``f`` on ``dtype`` (``DTYPE``) inputs, compiled and run in :func:`precision_scope` (``f`` itself on the
    CPU, with no scope to enter per call), waited for."""
    import jax

    if matmul_precision(dtype) is None:
        return lambda *a, **kw: jax.block_until_ready(f(*a, **kw))

    def call(*a, **kw):
        with precision_scope(dtype):
            return jax.block_until_ready(f(*a, **kw))

    return call


def torch_sync() -> None:
    """Wait for torch's device (a no-op on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cast(tree):
    """Every floating array of ``tree`` in ``DTYPE`` (parameters and inputs alike)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(DTYPE)

    def cast(x):
        return x.astype(dtype) if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def jax_call(forward: Callable[..., Any], args: tuple, mode: str) -> Callable[[], Any]:
    """A zero-argument call of ``forward(*args)`` (or of its gradient, for ``"fwd_bwd"``), jitted, synchronised."""
    import equinox as eqx
    import jax

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    args = _cast(args)
    if mode == "fwd_bwd":
        out = first(eqx.filter_eval_shape(forward, *args))
        r = jax.random.normal(jax.random.PRNGKey(2), out.shape, out.dtype)
        f = on_device(eqx.filter_jit(eqx.filter_grad(lambda a: (first(forward(*a)) * r).sum())))
        return lambda: f(args)
    f = on_device(eqx.filter_jit(forward))
    return lambda: f(*args)


def _inputs(B, L, E):
    import jax

    return jax.random.normal(jax.random.PRNGKey(1), (B, L, E))


def _projections(E):
    import jax

    k0, k1 = jax.random.split(jax.random.PRNGKey(0))
    return jax.random.normal(k0, (3 * E, E)) / E**0.5, jax.random.normal(k1, (E, E)) / E**0.5


def noxton_eqx(B, L, E, H, mode, implementation="auto"):
    import jax

    from noxton.nn import MultiheadAttention

    need = mode == "fwd_w"

    def forward(m, x):
        return jax.vmap(lambda xi: m(xi, xi, xi, need_weights=need, implementation=implementation))(x)

    return jax_call(forward, (MultiheadAttention(E, H, key=jax.random.PRNGKey(0)), _inputs(B, L, E)), mode)


def noxton_haiku(B, L, E, H, mode):
    import haiku as hk
    import jax

    import noxton.haiku as nxhk

    need = mode == "fwd_w"
    f = hk.transform(lambda x: nxhk.MultiheadAttention(E, H)(x, x, x, need_weights=need))
    x = _inputs(B, L, E)
    return jax_call(lambda p, x: f.apply(p, None, x), (f.init(jax.random.PRNGKey(0), x), x), mode)


def eqx_mha(B, L, E, H, mode):
    import equinox as eqx
    import jax

    def forward(m, x):
        return jax.vmap(lambda xi: m(xi, xi, xi))(x)

    return jax_call(forward, (eqx.nn.MultiheadAttention(H, E, key=jax.random.PRNGKey(0)), _inputs(B, L, E)), mode)


def haiku_mha(B, L, E, H, mode):
    import haiku as hk
    import jax

    init = hk.initializers.VarianceScaling(1.0)
    f = hk.transform(lambda x: hk.MultiHeadAttention(H, E // H, w_init=init, model_size=E)(x, x, x))
    x = _inputs(B, L, E)
    return jax_call(lambda p, x: f.apply(p, None, x), (f.init(jax.random.PRNGKey(0), x), x), mode)


def flax_mha(B, L, E, H, mode):
    from flax import nnx

    graphdef, state = nnx.split(nnx.MultiHeadAttention(H, E, decode=False, deterministic=True, rngs=nnx.Rngs(0)))
    return jax_call(lambda s, x: nnx.merge(graphdef, s)(x), (state, _inputs(B, L, E)), mode)


def jax_dpa(B, L, E, H, mode):
    """``jax.nn.dot_product_attention`` between the same projections (what the "fused" path calls)."""
    import jax

    def forward(w_in, w_out, x):
        q, k, v = (x @ w_in.T).reshape(B, L, 3, H, E // H).transpose(2, 0, 1, 3, 4)
        return jax.nn.dot_product_attention(q, k, v).reshape(B, L, E) @ w_out.T

    return jax_call(forward, (*_projections(E), _inputs(B, L, E)), mode)


def matmul_only(B, L, E, H, mode):
    """Lower bound: the matrix products of attention, with no softmax and no masking."""
    import jax.numpy as jnp

    def forward(w_in, w_out, x):
        q, k, v = jnp.split((x @ w_in.T).reshape(B, L, 3 * H, E // H), 3, axis=2)
        o = jnp.einsum("bhls,bshd->blhd", jnp.einsum("blhd,bshd->bhls", q, k), v)
        return o.reshape(B, L, E) @ w_out.T

    return jax_call(forward, (*_projections(E), _inputs(B, L, E)), mode)


def block_matmul_only(B, L, E, H, mode):
    """Lower bound for the blockwise path: its matrix products, in its blocks, with no softmax and no masking."""
    import jax.numpy as jnp
    from jax import lax

    from noxton.functional._blockwise import block_sizes

    D = E // H
    bq, bk = block_sizes(B * H, L, L)
    nq, nk = -(-L // bq), -(-L // bk)

    def forward(w_in, w_out, x):
        qkv = (x @ w_in.T).reshape(B, nq * bq, 3, H, D)
        q, k, v = (jnp.moveaxis(qkv[:, :, i], 1, 2) for i in range(3))  # [B, H, L, D]
        kb = jnp.moveaxis(k[:, :, : nk * bk].reshape(B, H, nk, bk, D), 2, 0)
        vb = jnp.moveaxis(v[:, :, : nk * bk].reshape(B, H, nk, bk, D), 2, 0)

        def q_block(qb):
            def step(acc, kv):
                s = jnp.einsum("bhqd,bhkd->bhqk", qb, kv[0])
                return acc + jnp.einsum("bhqk,bhkd->bhqd", s, kv[1]), None

            return lax.scan(step, jnp.zeros_like(qb), (kb, vb))[0]

        o = lax.map(q_block, jnp.moveaxis(q.reshape(B, H, nq, bq, D), 2, 0))
        o = jnp.moveaxis(o, 0, 2).reshape(B, H, nq * bq, D)
        return jnp.moveaxis(o, 1, 2).reshape(B, nq * bq, E) @ w_out.T

    return jax_call(forward, (*_projections(E), _inputs(B, nq * bq, E)), mode)


def torch_mha(B, L, E, H, mode, batch_first=False):
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    device, dtype = torch_device(), getattr(torch, DTYPE)
    m = torch.nn.MultiheadAttention(E, H, batch_first=batch_first).to(device, dtype)
    x = torch.randn((B, L, E) if batch_first else (L, B, E), device=device, dtype=dtype)
    if mode != "fwd_bwd":
        m.eval()

        def forward():
            with torch.no_grad():
                out = m(x, x, x, need_weights=mode == "fwd_w")
            torch_sync()
            return out

        return forward
    m.train()
    xg = x.clone().requires_grad_()
    r = torch.randn_like(x)

    def forward_backward():
        m.zero_grad(set_to_none=True)
        xg.grad = None
        out, _ = m(xg, xg, xg, need_weights=False)
        (out * r).sum().backward()
        torch_sync()
        return out

    return forward_backward


def torch_matmul_only(B, L, E, H, mode):
    """torch's side of the matmul-only lower bound (forward only)."""
    import torch

    torch.set_num_threads(THREADS)
    D = E // H
    device, dtype = torch_device(), getattr(torch, DTYPE)
    x = torch.randn(B, L, E, device=device, dtype=dtype)
    w_in = torch.randn(3 * E, E, device=device, dtype=dtype) / E**0.5
    w_out = torch.randn(E, E, device=device, dtype=dtype) / E**0.5

    def forward():
        with torch.no_grad():
            q, k, v = (x @ w_in.T).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
            out = ((q @ k.transpose(-1, -2)) @ v).transpose(1, 2).reshape(B, L, E) @ w_out.T
        torch_sync()
        return out

    return forward


# name -> (label, builder(B, L, E, H, mode) -> zero-argument call)
CONTENDERS: dict[str, tuple[str, Callable[..., Callable[[], Any]]]] = {
    "torch": ("torch MHA (batch_first=False)", torch_mha),
    "torch_batch_first": ("torch MHA (batch_first=True)", lambda *a: torch_mha(*a, batch_first=True)),
    "torch_matmul": ("torch matmul-only", torch_matmul_only),
    "noxton_eqx": ("noxton.nn (Equinox, auto)", noxton_eqx),
    "noxton_eqx_dense": ("noxton.nn implementation='dense'", lambda *a: noxton_eqx(*a, implementation="dense")),
    "noxton_eqx_fused": ("noxton.nn implementation='fused'", lambda *a: noxton_eqx(*a, implementation="fused")),
    "noxton_eqx_blockwise": (
        "noxton.nn implementation='blockwise'",
        lambda *a: noxton_eqx(*a, implementation="blockwise"),
    ),
    "noxton_haiku": ("noxton.haiku (auto)", noxton_haiku),
    "eqx": ("eqx.nn.MultiheadAttention", eqx_mha),
    "haiku": ("hk.MultiHeadAttention", haiku_mha),
    "flax": ("flax.nnx.MultiHeadAttention", flax_mha),
    "jax_dpa": ("jax.nn.dot_product_attention", jax_dpa),
    "matmul_only": ("JAX matmul-only lower bound", matmul_only),
    "block_matmul_only": ("JAX blockwise matmul-only lower bound", block_matmul_only),
}

# Contenders that materialise the (H, L, S) scores: not started where those would exceed the memory budget.
DENSE = {"torch_batch_first", "noxton_eqx_dense", "eqx", "jax_dpa"}


def label(name: str) -> str:
    return CONTENDERS[name][0]


def build(name: str, B: int, L: int, E: int, H: int, mode: str) -> Callable[[], Any]:
    return CONTENDERS[name][1](B, L, E, H, mode)
