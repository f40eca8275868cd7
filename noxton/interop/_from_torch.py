"""A torch module's configuration, read from its attributes (torch itself is never imported).

Each function returns the keyword arguments of the corresponding noxton
constructor, so that ``from_torch`` in both front ends restates no
hyperparameter by hand.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from noxton.functional._activations import activation_from_torch as _activation_module
from noxton.functional._activations import transformer_activation_from_torch
from noxton.interop._keys import to_numpy


def _require(module: Any, attrs: tuple[str, ...], what: str) -> None:
    missing = [a for a in attrs if not hasattr(module, a)]
    if missing:
        raise TypeError(
            f"`module` must be {what}, got {type(module).__name__}, which has no attribute(s) {', '.join(missing)}."
        )


def activation_from_torch(activation: Any):
    """The exact JAX function of a torch activation: a module (``nn.ReLU()``, ``nn.GELU(approximate="tanh")``,
    ``nn.Hardswish()``, ...) or a function (``F.relu``, ``F.gelu``, ...), as ``from_torch`` maps them.

    Raises ``ValueError`` naming the supported ones for an activation without an exact counterpart.

    Example:
        >>> import torch
        >>> from noxton.interop import activation_from_torch
        >>> activation_from_torch(torch.nn.ReLU6()).__name__, activation_from_torch(torch.nn.GELU()).__name__
        ('relu6', 'gelu')
    """
    return transformer_activation_from_torch("activation", activation)


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
        batch_first=bool(getattr(module, "batch_first", False)),
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
        activation=_activation_module("activation", module.activation),
        scale_activation=_activation_module("scale_activation", module.scale_activation),
        dtype=torch_dtype(module.fc1.weight),
    )


def transformer_layer_config_from_torch(module: Any, decoder: bool = False) -> dict[str, Any]:
    """Constructor kwargs of ``TransformerEncoderLayer`` (``TransformerDecoderLayer`` when ``decoder``)
    from the torch layer: sizes, dropout, activation (its exact JAX function), eps, norm_first, bias, dtype."""
    what = "a torch.nn.TransformerDecoderLayer" if decoder else "a torch.nn.TransformerEncoderLayer"
    attrs = ("self_attn", "linear1", "linear2", "norm1", "norm2", "dropout", "activation", "norm_first")
    _require(module, (*attrs, "multihead_attn", "norm3") if decoder else attrs, what)
    return dict(
        d_model=module.self_attn.embed_dim,
        nhead=module.self_attn.num_heads,
        dim_feedforward=module.linear1.out_features,
        dropout=float(module.dropout.p),
        activation=transformer_activation_from_torch("activation", module.activation),
        layer_norm_eps=float(module.norm1.eps),
        norm_first=bool(module.norm_first),
        bias=module.linear1.bias is not None,
        dtype=torch_dtype(module.linear1.weight),
    )


def _norm_config(norm: Any, what: str) -> dict[str, Any] | None:
    if norm is None:
        return None
    _require(norm, ("normalized_shape", "eps", "weight", "bias"), f"an nn.LayerNorm as {what}")
    if norm.weight is None or len(norm.normalized_shape) != 1:
        raise ValueError(
            f"{what} must be an nn.LayerNorm over the last axis with elementwise_affine=True, got "
            f"normalized_shape={tuple(norm.normalized_shape)}, weight={'None' if norm.weight is None else 'present'}."
        )
    return dict(normalized_shape=norm.normalized_shape[0], eps=float(norm.eps), bias=norm.bias is not None)


def transformer_stack_config_from_torch(module: Any, decoder: bool = False) -> dict[str, Any]:
    """``layer`` (the first layer's kwargs), ``num_layers`` and ``norm`` (LayerNorm kwargs or ``None``)
    of a torch ``nn.TransformerEncoder`` (``nn.TransformerDecoder`` when ``decoder``)."""
    what = "a torch.nn.TransformerDecoder" if decoder else "a torch.nn.TransformerEncoder"
    _require(module, ("layers", "num_layers", "norm"), what)
    return dict(
        layer=transformer_layer_config_from_torch(module.layers[0], decoder),
        num_layers=len(module.layers),
        norm=_norm_config(module.norm, f"`{'decoder' if decoder else 'encoder'}.norm`"),
    )


def transformer_config_from_torch(module: Any) -> dict[str, Any]:
    """Constructor kwargs of ``Transformer`` from a torch ``nn.Transformer`` built without custom parts."""
    _require(module, ("encoder", "decoder"), "a torch.nn.Transformer")
    enc = transformer_stack_config_from_torch(module.encoder)
    dec = transformer_stack_config_from_torch(module.decoder, decoder=True)
    layer = enc["layer"]
    expected_norm = dict(normalized_shape=layer["d_model"], eps=layer["layer_norm_eps"], bias=layer["bias"])
    if dec["layer"] != layer or enc["norm"] != expected_norm or dec["norm"] != expected_norm:
        raise ValueError(
            "`module` must be an nn.Transformer whose encoder and decoder layers share one configuration and "
            "whose encoder.norm and decoder.norm are LayerNorm(d_model, layer_norm_eps, bias) (as without "
            f"custom_encoder/custom_decoder); got encoder layer {layer}, decoder layer {dec['layer']}, "
            f"encoder.norm {enc['norm']}, decoder.norm {dec['norm']}. Build the parts with "
            "TransformerEncoder.from_torch and TransformerDecoder.from_torch instead."
        )
    return dict(layer, num_encoder_layers=enc["num_layers"], num_decoder_layers=dec["num_layers"])


def linear_config_from_torch(module: Any) -> dict[str, Any]:
    """Constructor kwargs of ``Linear`` from a torch ``nn.Linear``."""
    _require(module, ("in_features", "out_features", "weight", "bias"), "a torch.nn.Linear")
    return dict(
        in_features=module.in_features,
        out_features=module.out_features,
        bias=module.bias is not None,
        dtype=torch_dtype(module.weight),
    )


def layer_norm_config_from_torch(module: Any) -> dict[str, Any]:
    """Constructor kwargs of ``LayerNorm`` from a torch ``nn.LayerNorm`` over the last axis."""
    if module is None:
        raise TypeError("`module` must be a torch.nn.LayerNorm, got None.")
    return dict(_norm_config(module, "`module`") or {}, dtype=torch_dtype(module.weight))


def conv_config_from_torch(module: Any) -> dict[str, Any]:
    """Constructor kwargs of ``Conv1d``/``Conv2d`` from the torch convolution (``padding_mode="zeros"`` only)."""
    attrs = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    _require(module, (*attrs, "weight", "bias"), "a torch.nn.Conv1d or Conv2d")
    if module.padding_mode != "zeros":
        raise ValueError(f"`module.padding_mode` must be 'zeros', got {module.padding_mode!r}.")
    padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    return dict(
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        kernel_size=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=padding,
        dilation=tuple(module.dilation),
        groups=module.groups,
        bias=module.bias is not None,
        dtype=torch_dtype(module.weight),
    )


def batch_norm_config_from_torch(module: Any) -> dict[str, Any]:
    """Constructor kwargs of ``BatchNorm1d``/``BatchNorm2d`` from the torch BatchNorm (with running statistics)."""
    _require(module, ("num_features", "eps", "momentum", "affine", "track_running_stats"), "a torch BatchNorm")
    if not module.track_running_stats:
        raise ValueError("`module.track_running_stats` must be True (noxton's BatchNorm keeps running statistics).")
    return dict(
        num_features=module.num_features,
        eps=float(module.eps),
        momentum=None if module.momentum is None else float(module.momentum),
        affine=bool(module.affine),
        dtype=torch_dtype(module.running_mean),
    )


def dropout_config_from_torch(module: Any) -> dict[str, Any]:
    """Constructor kwargs of ``Dropout`` from a torch ``nn.Dropout``."""
    _require(module, ("p",), "a torch.nn.Dropout")
    return dict(p=float(module.p))


def sequential_children(module: Any) -> dict[str, Any]:
    """The named children of a torch ``nn.Sequential`` (or subclass, as torchvision's ``Conv2dNormActivation``)."""
    _require(module, ("named_children",), "a torch.nn.Sequential")
    if "Sequential" not in [c.__name__ for c in type(module).__mro__]:
        raise TypeError(f"`module` must be a torch.nn.Sequential (or a subclass), got {type(module).__name__}.")
    return dict(module.named_children())


#: The torch module classes that noxton converts, each to the noxton layer of the same name in either front end
#: (besides torchvision's SqueezeExcitation and the activations).
TORCH_LAYERS = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "LayerNorm",
    "Dropout",
    "MultiheadAttention",
    "Sequential",
)


def layer_from_torch(module: Any, namespace: Any, **kwargs: Any) -> Any:
    """The layer of ``namespace`` (``noxton.nn`` or ``noxton.haiku``) that converts the torch ``module``
    (its ``from_torch(module, **kwargs)``), or an activation's exact JAX function: both front ends'
    ``from_torch``."""
    kind = torch_kind(module, TORCH_LAYERS)
    if kind == "activation":
        return activation_from_torch(module)
    return getattr(namespace, kind).from_torch(module, **kwargs)


def torch_kind(module: Any, classes: Any) -> str:
    """Which noxton layer a torch module becomes: a name of ``classes`` (the nearest of its torch classes),
    ``"activation"`` or ``"SqueezeExcitation"`` (recognised by structure); a ``TypeError`` listing them else."""
    from noxton.functional._activations import TORCH_ACTIVATIONS, _torch_module_class

    if _torch_module_class(module) is not None and not isinstance(module, type):
        if type(module).__name__ in TORCH_ACTIVATIONS:
            return "activation"
        if all(hasattr(module, a) for a in ("fc1", "fc2", "activation", "scale_activation")):
            return "SqueezeExcitation"
        for base in type(module).__mro__:
            if base.__name__ in classes and base.__module__.startswith("torch"):
                return base.__name__
    raise TypeError(
        f"`module` must be a torch module that noxton converts ({', '.join(classes)}, torchvision's "
        f"SqueezeExcitation or an activation: {', '.join(TORCH_ACTIVATIONS)}), got {type(module).__name__}. "
        "Write that part of the model by hand (with noxton's layers) and load it with load_torch_state_dict."
    )
