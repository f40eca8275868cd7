"""``torch.nn.MultiheadAttention`` as a Haiku module."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from noxton.functional import _decoding as D
from noxton.functional import multi_head_attention
from noxton.functional._checks import check_dropout_key, check_inference, check_mha_config
from noxton.haiku import _initializers as init
from noxton.haiku._common import Linear, TorchModule, resolve_dtype
from noxton.interop._from_torch import mha_config_from_torch


class MultiheadAttention(TorchModule):
    """Multi-head attention, exactly ``torch.nn.MultiheadAttention``, as a Haiku module.

    Parameters are created on the first call with torch's names, shapes and
    initialisation, so ``params`` reads like torch's ``state_dict``:

    - ``in_proj_weight`` ``(3E, E)``, Xavier-uniform; or, when ``kdim`` or
      ``vdim`` differ from ``embed_dim``, ``q_proj_weight`` ``(E, E)``,
      ``k_proj_weight`` ``(E, kdim)`` and ``v_proj_weight`` ``(E, vdim)``.
    - ``in_proj_bias`` ``(3E,)``, zeros (when ``bias``).
    - ``bias_k``, ``bias_v`` ``(1, 1, E)``, Xavier-normal (when ``add_bias_kv``).
    - submodule ``out_proj``: ``weight`` ``(E, E)`` (torch's Linear default) and
      ``bias`` ``(E,)``, zeros (when ``bias``).

    Shape:
        - query: ``[..., L, E]``; key: ``[..., S, kdim]``; value: ``[..., S, vdim]``.
        - key_padding_mask: ``[..., S]``; attn_mask: ``(L, S)``, ``(H, L, S)`` or ``[..., H, L, S]``.
        - output: ``[..., L, E]``; weights: ``[..., L, S']`` averaged or ``[..., H, L, S']``,
          where ``S'`` counts the keys appended by ``add_bias_kv``/``add_zero_attn``.

    ``batch_first`` is torch's: ``False`` (torch's default, and what ``from_torch`` carries from such a
    module) takes and returns torch's ``(L, N, E)`` (``(S, N, kdim)`` for ``key``; masks as torch's,
    ``key_padding_mask`` ``(N, S)``, weights ``(N, L, S)``); ``True`` and ``None`` (the default, noxton's
    own) take leading batch axes ``[..., L, E]``.

    Dropout on the attention weights draws its key from ``hk.next_rng_key()``
    when ``dropout > 0`` and ``inference`` is ``False``; pass ``inference=True``
    (Haiku's ``is_training=False``) to switch it off.

    Example:
        >>> import haiku as hk, jax
        >>> from noxton.haiku import MultiheadAttention
        >>> f = hk.transform(lambda x: MultiheadAttention(64, 4)(x, x, x))
        >>> x = jax.numpy.ones((2, 10, 64))
        >>> params = f.init(jax.random.PRNGKey(0), x)
        >>> out, weights = f.apply(params, None, x)
        >>> out.shape, weights.shape
        ((2, 10, 64), (2, 10, 10))
    """

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
        *,
        batch_first: bool | None = None,
        dtype=None,
        name: str | None = None,
    ):
        super().__init__(name=name)
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
        self.head_dim = self.embed_dim // self.num_heads
        self.dtype = resolve_dtype(dtype)
        self._qkv_same_embed_dim = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        E = self.embed_dim
        self.out_proj = Linear(E, E, self.bias, b_init=init.zeros, dtype=self.dtype, name="out_proj")

    _config_from_torch = staticmethod(mha_config_from_torch)

    def params(self) -> dict[str, jax.Array]:
        """This module's own parameters (creating them on first use), keyed by torch's names."""
        E, dt = self.embed_dim, self.dtype
        p = {}
        if self._qkv_same_embed_dim:
            p["in_proj_weight"] = self.param("in_proj_weight", (3 * E, E), dt, init.xavier_uniform)
        else:
            p["q_proj_weight"] = self.param("q_proj_weight", (E, E), dt, init.xavier_uniform)
            p["k_proj_weight"] = self.param("k_proj_weight", (E, self.kdim), dt, init.xavier_uniform)
            p["v_proj_weight"] = self.param("v_proj_weight", (E, self.vdim), dt, init.xavier_uniform)
        if self.bias:
            p["in_proj_bias"] = self.param("in_proj_bias", (3 * E,), dt, init.zeros)
        if self.add_bias_kv:
            p["bias_k"] = self.param("bias_k", (1, 1, E), dt, init.xavier_normal)
            p["bias_v"] = self.param("bias_v", (1, 1, E), dt, init.xavier_normal)
        return p

    def _all_params(self) -> dict[str, jax.Array]:
        # As torch's F.multi_head_attention_forward, the output projection's weights are read, not called.
        return {**self.params(), **{f"out_proj.{k}": v for k, v in self.out_proj.params().items()}}

    def __call__(
        self,
        query: ArrayLike,
        key: ArrayLike,
        value: ArrayLike,
        key_padding_mask: ArrayLike | None = None,
        need_weights: bool = True,
        attn_mask: ArrayLike | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        inference: bool = False,
        implementation: str = "auto",
    ) -> tuple[jax.Array, jax.Array | None]:
        """Attend from ``query`` to ``key``/``value``; see the class docstring for shapes.

        Args:
            query: ``[..., L, E]``.
            key: ``[..., S, kdim]``.
            value: ``[..., S, vdim]``.
            key_padding_mask: ``[..., S]``, bool (True = ignore that key) or float (added).
            need_weights: also return the attention weights (after dropout, as torch).
            attn_mask: ``(L, S)``, ``(H, L, S)`` or ``[..., H, L, S]``, bool
                (True = not allowed) or float (added to the scores).
            average_attn_weights: average the returned weights over heads.
            is_causal: with no ``attn_mask``, apply the causal mask; with one, use it as given.
            inference: switch dropout off.
            implementation: attention path, ``"auto"`` (default), ``"dense"``,
                ``"fused"`` (``jax.nn.dot_product_attention``) or ``"blockwise"``
                (memory-efficient, never holds an ``L x S`` array). Only the dense
                path returns weights: ``"fused"``/``"blockwise"`` with
                ``need_weights=True`` raise ``ValueError``, as does ``"fused"`` with
                active dropout. Blockwise dropout draws its own pattern. See
                [`select_implementation`][noxton.functional.select_implementation] for the ``"auto"`` rule.

        Returns:
            ``(attn_output, attn_weights)``; ``attn_weights`` is ``None`` when
            ``need_weights=False``.
        """
        inference = check_inference(inference, "haiku")
        seq_first = self.batch_first is False and _seq_first(query, key, value)
        if seq_first:  # torch's default layout (L, N, E): run as (N, L, E), return the output as (L, N, E)
            query, key, value = (jnp.swapaxes(jnp.asarray(a), 0, 1) for a in (query, key, value))
        params = self._all_params()
        dropout_p = 0.0 if inference else self.dropout
        dropout_key = check_dropout_key(dropout_p, hk.maybe_next_rng_key() if dropout_p > 0.0 else None, "haiku")
        out, weights = multi_head_attention(
            query,
            key,
            value,
            params,
            num_heads=self.num_heads,
            add_zero_attn=self.add_zero_attn,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            dropout_p=dropout_p,
            dropout_key=dropout_key,
            implementation=implementation,
        )
        return (jnp.swapaxes(out, 0, 1) if seq_first else out), weights

    # Decoding with a key/value cache, kept in this module's Haiku state (``hk.transform_with_state``):
    # ``key``, ``value``, ``padding``, ``index`` (and ``mask`` for a memory), as noxton.functional._decoding.

    def init_cache(self, max_len: int, *, batch_shape: tuple[int, ...] = (), dtype=None) -> None:
        """Make an empty cache of ``max_len`` positions for causal self-attention
        ([`decode`][noxton.haiku.MultiheadAttention.decode]), in this module's Haiku state: keys and
        values ``[*batch_shape, H, max_len, E / H]`` of ``dtype`` (the parameters' by default), the padding of
        each position and the number written."""
        dtype = self.dtype if dtype is None else resolve_dtype(dtype)
        self.params()  # the parameters exist before the first decode, also when init only makes the cache
        _set_state(
            D.self_attention_cache(max_len, self.embed_dim, self.num_heads, batch_shape=batch_shape, dtype=dtype)
        )

    def decode(
        self, x: ArrayLike, cache=None, key_padding_mask: ArrayLike | None = None, *, implementation: str = "auto"
    ) -> jax.Array:
        """Causal self-attention of the next ``n`` positions ``x`` ``[..., n, E]``: exactly what
        ``self(x_all, x_all, x_all, is_causal=True)`` over every position so far returns at them.

        The earlier positions' keys and values come from the cache in this module's Haiku state (made by
        [`init_cache`][noxton.haiku.MultiheadAttention.init_cache]), which this call extends. ``key_padding_mask``
        ``[..., n]`` marks padded positions among the new ones. Dropout is off (decoding is inference).
        """
        _no_cache(cache)
        out, new = D.decode_self_attention(
            x,
            self._all_params(),
            _get_state(self.module_name, D.SELF_ATTENTION_CACHE),
            num_heads=self.num_heads,
            add_zero_attn=self.add_zero_attn,
            key_padding_mask=key_padding_mask,
            implementation=implementation,
        )
        _set_state(new)
        return out

    def init_memory_cache(
        self,
        memory: ArrayLike,
        max_len: int,
        attn_mask: ArrayLike | None = None,
        key_padding_mask: ArrayLike | None = None,
    ) -> None:
        """Project ``memory`` ``[..., S, kdim]``'s keys and values once, into this module's Haiku state, for
        [`decode_memory`][noxton.haiku.MultiheadAttention.decode_memory] of up to ``max_len`` target
        positions; ``attn_mask`` ``(max_len, S)`` (or per head/batch) and ``key_padding_mask`` ``[..., S]``
        as torch's ``memory_mask`` and ``memory_key_padding_mask``."""
        _set_state(
            D.memory_cache(
                memory,
                self._all_params(),
                max_len,
                num_heads=self.num_heads,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
            )
        )

    def decode_memory(self, x: ArrayLike, cache=None, *, implementation: str = "auto") -> jax.Array:
        """Attention of the next ``n`` target positions ``x`` ``[..., n, E]`` to the memory that
        [`init_memory_cache`][noxton.haiku.MultiheadAttention.init_memory_cache] projected: exactly
        ``self(x, memory, memory, attn_mask=..., key_padding_mask=...)`` at those positions."""
        _no_cache(cache)
        out, new = D.decode_memory_attention(
            x,
            self._all_params(),
            _get_state(self.module_name, D.MEMORY_CACHE),
            num_heads=self.num_heads,
            add_zero_attn=self.add_zero_attn,
            implementation=implementation,
        )
        _set_state(new)
        return out


def _no_cache(cache) -> None:
    if cache is not None:
        raise TypeError(
            "`cache` must be None in noxton.haiku: a Haiku module keeps its cache in Haiku state "
            f"(hk.transform_with_state), got {type(cache).__name__}."
        )


def _set_state(cache) -> None:
    for name, value in cache.items():
        hk.set_state(name, value)


def _get_state(module: str, names) -> dict[str, jax.Array]:
    try:
        return {name: hk.get_state(name) for name in names}
    except Exception as e:  # Haiku's own error for a missing entry names neither the cause nor the fix
        raise ValueError(
            f"{module} has no cache in its Haiku state: call init_cache (or, for a "
            "memory, init_memory_cache) first, in the same hk.transform_with_state function or one whose state "
            "is passed in."
        ) from e


def _check_batch_first(batch_first):
    if batch_first is not None and not isinstance(batch_first, bool):
        raise TypeError(f"`batch_first` must be None, True or False (torch's), got {batch_first!r}.")
    return batch_first


def _seq_first(query, key, value) -> bool:
    """``batch_first=False``: 3-D inputs are torch's ``(L, N, E)``; 2-D ones unbatched, as in torch."""
    ranks = [jnp.ndim(a) for a in (query, key, value)]
    if any(r not in (2, 3) for r in ranks) or len(set(ranks)) != 1:
        raise ValueError(
            "With batch_first=False, query, key and value must be torch's (L, N, E) (or unbatched (L, E)), "
            f"got ranks {ranks}; pass batch_first=None for leading batch axes [..., L, E]."
        )
    return ranks[0] == 3
