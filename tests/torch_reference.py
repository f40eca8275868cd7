"""Build torch reference modules and inputs shared by the parity tests."""

from __future__ import annotations

import itertools

import numpy as np
from conftest import torch

# The one torch squeeze-excitation block, shared with the benchmark; the tests import it from here.
from benchmarks.reference import TorchSqueezeExcitation  # noqa: F401


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


def grid(**axes):
    """Cross-product of named options as (id, dict) pairs for pytest.mark.parametrize."""
    names = list(axes)
    out = []
    for values in itertools.product(*axes.values()):
        d = dict(zip(names, values, strict=True))
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
