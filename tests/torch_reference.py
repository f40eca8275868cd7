"""Build torch reference modules and inputs shared by the parity tests."""

from __future__ import annotations

import itertools

import numpy as np

from conftest import torch


def torch_mha(cfg, dtype, seed=0):
    """A torch MHA with every parameter randomised (torch zero-initialises biases)."""
    torch.manual_seed(seed)
    m = torch.nn.MultiheadAttention(
        cfg["embed_dim"],
        cfg["num_heads"],
        bias=cfg["bias"],
        add_bias_kv=cfg["add_bias_kv"],
        add_zero_attn=cfg["add_zero_attn"],
        kdim=cfg.get("kdim"),
        vdim=cfg.get("vdim"),
        batch_first=True,
        dtype=dtype,
    )
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.5, 0.5)
    return m.eval()


class TorchSqueezeExcitation(torch.nn.Module if torch is not None else object):
    """torchvision.ops.SqueezeExcitation, rebuilt from torch.nn (torchvision has no CPU wheel here)."""

    def __init__(self, input_channels, squeeze_channels, activation=None, scale_activation=None):
        super().__init__()
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc1 = torch.nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = torch.nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation or torch.nn.ReLU()
        self.scale_activation = scale_activation or torch.nn.Sigmoid()

    def forward(self, x):
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


def grid(**axes):
    """Cross-product of named options as (id, dict) pairs for pytest.mark.parametrize."""
    names = list(axes)
    out = []
    for values in itertools.product(*axes.values()):
        d = dict(zip(names, values))
        out.append(d)
    return out


def random_bool_mask(rng, shape):
    m = rng.random(shape) < 0.4
    m[..., 0] = False  # keep a visible key in every row so torch stays finite
    return m


def random_float_mask(rng, shape):
    m = rng.normal(size=shape)
    m[rng.random(shape) < 0.2] = -np.inf
    m[..., 0] = 0.0
    return m
