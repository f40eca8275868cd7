"""A torch module's configuration, read from its attributes (torch itself is never imported).

Each function returns the keyword arguments of the corresponding noxton
constructor, so that ``from_torch`` in both front ends restates no
hyperparameter by hand.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from noxton.functional._activations import activation_from_torch
from noxton.interop._keys import to_numpy


def _require(module: Any, attrs: tuple[str, ...], what: str) -> None:
    missing = [a for a in attrs if not hasattr(module, a)]
    if missing:
        raise TypeError(
            f"`module` must be {what}, got {type(module).__name__}, which has no attribute(s) {', '.join(missing)}."
        )


def torch_dtype(tensor: Any):
    """The JAX dtype of a torch tensor (``torch.float32`` -> ``float32``)."""
    return jnp.dtype(str(tensor.dtype).removeprefix("torch."))


def state_dict_from_torch(module: Any) -> dict[str, Any]:
    """``module.state_dict()`` as NumPy arrays."""
    return {k: to_numpy(v) for k, v in module.state_dict().items()}


def mha_config_from_torch(module: Any) -> dict[str, Any]:
    """Constructor kwargs of ``MultiheadAttention`` from a torch ``nn.MultiheadAttention``."""
    _require(
        module,
        ("embed_dim", "num_heads", "dropout", "in_proj_bias", "bias_k", "add_zero_attn", "kdim", "vdim", "out_proj"),
        "a torch.nn.MultiheadAttention",
    )
    return dict(
        embed_dim=module.embed_dim,
        num_heads=module.num_heads,
        dropout=float(module.dropout),
        bias=module.in_proj_bias is not None,
        add_bias_kv=module.bias_k is not None,
        add_zero_attn=bool(module.add_zero_attn),
        kdim=module.kdim,
        vdim=module.vdim,
        dtype=torch_dtype(module.out_proj.weight),
    )


def _check_pointwise_conv(name: str, conv: Any) -> None:
    _require(conv, ("weight", "bias", "groups", "stride", "padding", "dilation"), f"a 1x1 nn.Conv2d as `{name}`")
    shape = tuple(conv.weight.shape)
    problems = []
    if len(shape) != 4 or shape[2:] != (1, 1):
        problems.append(f"weight shape {shape} (expected (out, in, 1, 1))")
    if conv.bias is None:
        problems.append("no bias")
    if conv.groups != 1:
        problems.append(f"groups={conv.groups}")
    if tuple(conv.stride) != (1, 1) or tuple(conv.dilation) != (1, 1) or tuple(conv.padding) not in ((0, 0), "valid"):
        problems.append(f"stride={conv.stride}, padding={conv.padding}, dilation={conv.dilation}")
    if problems:
        raise ValueError(
            f"`module.{name}` must be a 1x1 nn.Conv2d with bias, groups=1, stride 1, no padding, got "
            + "; ".join(problems)
            + "."
        )


def se_config_from_torch(module: Any) -> dict[str, Any]:
    """Constructor kwargs of ``SqueezeExcitation`` from a torch squeeze-excitation block.

    Recognised by structure, as torchvision's ``SqueezeExcitation``: 1x1
    convolutions ``fc1``, ``fc2`` and activation modules ``activation``,
    ``scale_activation``, mapped to their exact JAX functions.
    """
    _require(
        module,
        ("fc1", "fc2", "activation", "scale_activation"),
        "a squeeze-excitation block (torchvision.ops.SqueezeExcitation: fc1, fc2, activation, scale_activation)",
    )
    _check_pointwise_conv("fc1", module.fc1)
    _check_pointwise_conv("fc2", module.fc2)
    squeeze, channels = tuple(module.fc1.weight.shape[:2])
    if tuple(module.fc2.weight.shape[:2]) != (channels, squeeze):
        raise ValueError(
            f"`module.fc2` must map {squeeze} channels back to {channels}, got weight shape "
            f"{tuple(module.fc2.weight.shape)}."
        )
    return dict(
        input_channels=channels,
        squeeze_channels=squeeze,
        activation=activation_from_torch("activation", module.activation),
        scale_activation=activation_from_torch("scale_activation", module.scale_activation),
        dtype=torch_dtype(module.fc1.weight),
    )
