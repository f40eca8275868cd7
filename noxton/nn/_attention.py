"""``noxton.nn.MultiheadAttention``: the Haiku module, adapted to Equinox."""

from __future__ import annotations

import equinox as eqx
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray

from noxton.functional._checks import check_array, check_dropout_key, check_inference, check_mha_config
from noxton.functional._decoding import MEMORY_CACHE, SELF_ATTENTION_CACHE, check_cache
from noxton.haiku import MultiheadAttention as HaikuMultiheadAttention
from noxton.haiku._attention import _check_batch_first
from noxton.haiku._common import resolve_dtype
from noxton.interop._from_torch import mha_config_from_torch
from noxton.nn._adapter import Adapted, from_torch_weights
from noxton.nn._linear import Linear


class MultiheadAttention(Adapted):
    """A 1-to-1 JAX/Equinox port of ``torch.nn.MultiheadAttention``.

    Splits queries, keys and values into ``num_heads`` independent heads,
    computes scaled dot-product attention for each head in parallel, and projects
    the concatenated outputs back to ``embed_dim``. Inputs are unbatched, as in
    every ``eqx.nn`` layer: batch with ``jax.vmap``.

    The parameters are attributes named, shaped and initialised as torch's
    (see Attributes), so ``mha.out_proj.weight``, ``eqx.tree_at``, optax masks and
    sharding specs address them as in torch; ``from_torch`` builds a layer from a
    torch module.

    This layer is API-compatible with ``torch.nn.MultiheadAttention``. Unless
    you need that compatibility, ``eqx.nn.MultiheadAttention`` is more idiomatic.

    Args:
        embed_dim: ``E``, the model (query) dimension.
        num_heads: ``H``; ``embed_dim`` must be divisible by it.
        dropout: dropout probability on the attention weights. Default ``0.0``.
        bias: learnable biases on the input and output projections. Default ``True``.
        add_bias_kv: append learnable ``bias_k``/``bias_v`` to the keys and values.
        add_zero_attn: append a zero key and value.
        kdim: key feature size; defaults to ``embed_dim``.
        vdim: value feature size; defaults to ``embed_dim``.
        inference: disable dropout (``eqx.nn.inference_mode`` toggles it).
        key: PRNG key for parameter initialisation.
        dtype: parameter dtype; ``None`` is float32 (float64 under ``jax_enable_x64``).

    Attributes:
        in_proj_weight: ``(3E, E)``, when ``kdim == vdim == embed_dim``; else ``None``.
        q_proj_weight: ``(E, E)``, when ``kdim`` or ``vdim`` differ; else ``None``.
        k_proj_weight: ``(E, kdim)``, likewise.
        v_proj_weight: ``(E, vdim)``, likewise.
        in_proj_bias: ``(3E,)``, when ``bias``; else ``None``.
        bias_k: ``(1, 1, E)``, when ``add_bias_kv``; else ``None``.
        bias_v: ``(1, 1, E)``, likewise.
        out_proj: a [`Linear`][noxton.nn.Linear] with ``weight`` ``(E, E)`` and ``bias`` ``(E,)`` (or ``None``).

    Shape:
        - query: ``(L, E)``; key: ``(S, kdim)``; value: ``(S, vdim)``.
        - key_padding_mask: ``(S,)``; attn_mask: ``(L, S)`` or ``(H, L, S)``.
        - output: ``(L, E)``; weights: ``(L, S')`` averaged or ``(H, L, S')`` per head,
          ``S' = S + add_bias_kv + add_zero_attn``.

    Differences from torch:
        - Inputs are unbatched ``(L, E)`` (use ``jax.vmap``). ``batch_first`` (torch's, which
          ``from_torch`` carries) only records the batch axis of torch's layout, ``batch_axis``:
          ``jax.vmap(f, in_axes=mha.batch_axis, out_axes=mha.batch_axis)`` maps torch's batches.
        - A query whose keys are all masked gets a zero attention result (its output
          is ``out_proj.bias``) and zero weights, with finite gradients. torch gives
          NaN there when ``need_weights=True`` and zeros when it is ``False``.
        - ``is_causal=True`` without ``attn_mask`` builds the causal mask (torch
          raises); with an ``attn_mask``, that mask is used, as torch does.
        - The dropout key is explicit (``dropout_key``) and training is
          ``inference=False``, not ``module.train()``.

    Example:
        >>> import jax
        >>> from noxton.nn import MultiheadAttention
        >>> key = jax.random.PRNGKey(0)
        >>> mha = MultiheadAttention(embed_dim=64, num_heads=4, key=key)
        >>> q = jax.random.normal(key, (10, 64))
        >>> out, weights = mha(q, q, q)
        >>> out.shape, weights.shape
        ((10, 64), (10, 10))
        >>> out, _ = mha(q, q, q, is_causal=True, need_weights=False)
    """

    in_proj_weight: Float[Array, "3*embed_dim embed_dim"] | None
    q_proj_weight: Float[Array, "embed_dim embed_dim"] | None
    k_proj_weight: Float[Array, "embed_dim kdim"] | None
    v_proj_weight: Float[Array, "embed_dim vdim"] | None
    in_proj_bias: Float[Array, " 3*embed_dim"] | None
    bias_k: Float[Array, "1 1 embed_dim"] | None
    bias_v: Float[Array, "1 1 embed_dim"] | None
    out_proj: Linear
    inference: bool
    embed_dim: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    bias: bool = eqx.field(static=True)
    add_bias_kv: bool = eqx.field(static=True)
    add_zero_attn: bool = eqx.field(static=True)
    kdim: int = eqx.field(static=True)
    vdim: int = eqx.field(static=True)
    dtype: np.dtype = eqx.field(static=True)
    batch_first: bool | None = eqx.field(static=True, default=None)

    haiku_module = HaikuMultiheadAttention
    equinox_only = ("batch_first",)

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        inference: bool = False,
        *,
        key: PRNGKeyArray,
        dtype=None,
        batch_first: bool | None = None,
    ):
        self.batch_first = _check_batch_first(batch_first)
        config = check_mha_config(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim)
        self.embed_dim = config["embed_dim"]
        self.num_heads = config["num_heads"]
        self.dropout = config["dropout"]
        self.bias = config["bias"]
        self.add_bias_kv = config["add_bias_kv"]
        self.add_zero_attn = config["add_zero_attn"]
        self.kdim = config["kdim"]
        self.vdim = config["vdim"]
        self.inference = check_inference(inference, "equinox")
        self.dtype = resolve_dtype(dtype)
        sd = self._initial_state_dict(key)
        self.in_proj_weight = sd.get("in_proj_weight")
        self.q_proj_weight = sd.get("q_proj_weight")
        self.k_proj_weight = sd.get("k_proj_weight")
        self.v_proj_weight = sd.get("v_proj_weight")
        self.in_proj_bias = sd.get("in_proj_bias")
        self.bias_k = sd.get("bias_k")
        self.bias_v = sd.get("bias_v")
        self.out_proj = Linear.from_arrays(sd["out_proj.weight"], sd.get("out_proj.bias"))

    @property
    def batch_axis(self) -> int:
        """The batch axis of torch's layout for this layer: 1 with ``batch_first=False`` (torch's ``(L, N, E)``),
        else 0. Map a torch batch with ``jax.vmap(f, in_axes=mha.batch_axis, out_axes=mha.batch_axis)``."""
        return 1 if self.batch_first is False else 0

    @classmethod
    def from_torch(cls, module) -> MultiheadAttention:
        """A layer with the whole configuration and the weights of a torch ``nn.MultiheadAttention``.

        Takes ``embed_dim``, ``num_heads``, ``dropout``, ``bias``, ``add_bias_kv``,
        ``add_zero_attn``, ``kdim``, ``vdim``, the parameter dtype and ``inference``
        (``not module.training``), so nothing is restated by hand. torch's
        ``batch_first`` is recorded (inputs here are unbatched ``(L, E)``): ``batch_axis`` is the axis
        to ``jax.vmap`` over in torch's layout, 1 for torch's default ``(L, N, E)``.

        Example:
            >>> import torch
            >>> from noxton.nn import MultiheadAttention
            >>> torch_mha = torch.nn.MultiheadAttention(64, 4, dropout=0.1).eval()
            >>> mha = MultiheadAttention.from_torch(torch_mha)
            >>> mha.num_heads, mha.dropout, mha.inference, mha.out_proj.weight.shape
            (4, 0.1, True, (64, 64))
        """
        config = mha_config_from_torch(module)
        return from_torch_weights(module, lambda key: cls(**config, inference=not module.training, key=key))

    def __call__(
        self,
        query: Float[ArrayLike, "tgt_len embed_dim"],
        key: Float[ArrayLike, "src_len kdim"],
        value: Float[ArrayLike, "src_len vdim"],
        key_padding_mask: Bool[ArrayLike, " src_len"] | Float[ArrayLike, " src_len"] | None = None,
        need_weights: bool = True,
        attn_mask: Bool[ArrayLike, "*heads tgt_len src_len"] | Float[ArrayLike, "*heads tgt_len src_len"] | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        dropout_key: PRNGKeyArray | None = None,
        *,
        implementation: str = "auto",
    ) -> tuple[Float[Array, "tgt_len embed_dim"], Float[Array, "*weight_heads tgt_len keys"] | None]:
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: ``(L, E)``.
            key: ``(S, kdim)``.
            value: ``(S, vdim)``.
            key_padding_mask: ``(S,)``, bool (True = ignore that key) or float (added to the scores).
            need_weights: also return the attention weights (after dropout, as torch).
            attn_mask: ``(L, S)`` or ``(H, L, S)``, bool (True = not allowed) or float (added).
            average_attn_weights: average the returned weights over heads.
            is_causal: with no ``attn_mask``, apply the causal mask; with one, use it as given.
            dropout_key: PRNG key for dropout; needed when ``dropout > 0`` and not ``inference``.
            implementation: keyword-only attention path: ``"auto"`` (default),
                ``"dense"``, ``"fused"`` (``jax.nn.dot_product_attention``) or
                ``"blockwise"`` (memory-efficient: never holds an ``(L, S)`` array,
                forward or backward). Only the dense path returns weights, so
                ``"fused"``/``"blockwise"`` need ``need_weights=False`` (else
                ``ValueError``); ``"fused"`` has no dropout. Under ``jax.vmap`` the
                ``"auto"`` rule counts the mapped examples too, as the Haiku
                module counts its leading batch axes.

        Returns:
            ``(attn_output (L, E), attn_weights)``: ``None`` when ``need_weights=False``,
            ``(L, S')`` when averaged, ``(H, L, S')`` per head.
        """
        inference = check_inference(self.inference, "equinox")
        dropout_key = check_dropout_key(0.0 if inference else self.dropout, dropout_key, "equinox")
        check_array("query", query, min_rank=2, max_rank=2, layout="(L, E)")
        check_array("key", key, min_rank=2, max_rank=2, layout="(S, kdim)")
        check_array("value", value, min_rank=2, max_rank=2, layout="(S, vdim)")
        return self._apply(
            dropout_key,
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            inference=inference,
            implementation=implementation,
        )

    # Decoding with a key/value cache: the Haiku module's methods, on the cache passed in (its Haiku state).

    def init_cache(self, max_len: int, *, batch_shape: tuple[int, ...] = (), dtype=None) -> dict[str, Array]:
        """An empty cache of ``max_len`` positions for [`decode`][noxton.nn.MultiheadAttention.decode]
        (causal self-attention): a dict of arrays of fixed shapes, keys and values ``(H, max_len, E / H)``
        (``[*batch_shape, H, max_len, E / H]``) of ``dtype`` (the parameters' by default). Batch it as the
        inputs: ``jax.vmap`` over ``decode`` with the cache mapped too (``batch_shape=(B,)``, or
        ``jax.vmap`` of the function that makes it); reorder a batched cache for beam search with
        ``jax.tree.map(lambda a: a[beams], cache)``.

        Example:
            >>> import jax
            >>> from noxton.nn import MultiheadAttention
            >>> mha = MultiheadAttention(16, 4, key=jax.random.PRNGKey(0))
            >>> cache = mha.init_cache(8)
            >>> x = jax.numpy.ones((3, 16))
            >>> out, cache = mha.decode(x[:2], cache)   # prefill two positions
            >>> out, cache = mha.decode(x[2:], cache)   # then one more
            >>> full, _ = mha(x, x, x, is_causal=True, need_weights=False)
            >>> bool(jax.numpy.allclose(out, full[2:], atol=1e-6)), int(cache["index"])
            (True, 3)
        """
        return self._apply_method("init_cache", None, max_len, batch_shape=batch_shape, dtype=dtype)[1]

    def decode(
        self,
        x: Float[ArrayLike, "n embed_dim"],
        cache: dict[str, Array],
        key_padding_mask: Bool[ArrayLike, " n"] | Float[ArrayLike, " n"] | None = None,
        *,
        implementation: str = "auto",
    ) -> tuple[Float[Array, "n embed_dim"], dict[str, Array]]:
        """Causal self-attention of the next ``n`` positions ``x`` ``(n, E)``, through ``cache``.

        Returns ``(out (n, E), cache)``: ``out`` is exactly what ``self(x_all, x_all, x_all,
        is_causal=True)`` over every position decoded so far returns at these positions, and the
        cache holds them too. ``key_padding_mask`` ``(n,)`` marks padded positions among them,
        hidden from every later query (torch's ``key_padding_mask`` over the whole sequence). Dropout
        is off: decoding is inference. Past ``max_len``: ``ValueError`` outside ``jit``; under ``jit``
        those positions come out NaN.
        """
        check_array("x", x, min_rank=2, max_rank=2, layout="(n, E)")
        return self._apply_method(
            "decode",
            check_cache("cache", cache, SELF_ATTENTION_CACHE),
            x,
            key_padding_mask=key_padding_mask,
            implementation=implementation,
        )

    def init_memory_cache(
        self,
        memory: Float[ArrayLike, "src_len kdim"],
        max_len: int,
        attn_mask: Bool[ArrayLike, "*heads max_len src_len"] | Float[ArrayLike, "*heads max_len src_len"] | None = None,
        key_padding_mask: Bool[ArrayLike, " src_len"] | Float[ArrayLike, " src_len"] | None = None,
    ) -> dict[str, Array]:
        """The cache of attention to ``memory`` ``(S, kdim)`` for
        [`decode_memory`][noxton.nn.MultiheadAttention.decode_memory] of up to ``max_len`` target
        positions: its keys and values, projected once, and the masks (``attn_mask`` ``(max_len, S)`` or
        ``(H, max_len, S)``, ``key_padding_mask`` ``(S,)``, as a call's)."""
        check_array("memory", memory, min_rank=2, max_rank=2, layout="(S, kdim)")
        return self._apply_method(
            "init_memory_cache", None, memory, max_len, attn_mask=attn_mask, key_padding_mask=key_padding_mask
        )[1]

    def decode_memory(
        self, x: Float[ArrayLike, "n embed_dim"], cache: dict[str, Array], *, implementation: str = "auto"
    ) -> tuple[Float[Array, "n embed_dim"], dict[str, Array]]:
        """Attention of the next ``n`` target positions ``x`` ``(n, E)`` to the memory in ``cache``:
        exactly ``self(x, memory, memory, attn_mask=..., key_padding_mask=...)`` at those positions.
        Returns ``(out (n, E), cache)``."""
        check_array("x", x, min_rank=2, max_rank=2, layout="(n, E)")
        cache = check_cache("cache", cache, MEMORY_CACHE)
        return self._apply_method("decode_memory", cache, x, implementation=implementation)
