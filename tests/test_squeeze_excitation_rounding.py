"""Squeeze-excitation in float16/bfloat16 is at least as exact as torch's against float64.

torch rounds after each 1x1 convolution (bias added before the rounding, as
``addmm``), after the activations and after the final product; noxton pools,
convolves, adds the biases and activates in float32 and rounds the scale once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TorchSqueezeExcitation, requires_torch, torch

from noxton.nn import SqueezeExcitation

pytestmark = requires_torch

C, Q = 16, 4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_squeeze_excitation_no_less_exact_than_torch(dtype):
    td = getattr(torch, dtype)
    se = SqueezeExcitation(C, Q, key=jax.random.PRNGKey(0), dtype=jnp.dtype(dtype))
    run = jax.jit(jax.vmap(lambda layer, x: layer(x), in_axes=(None, 0)))
    worse = 0
    for seed in range(10):
        torch.manual_seed(seed)
        module = TorchSqueezeExcitation(C, Q).to(td)
        with torch.no_grad():
            for p in module.parameters():
                p.uniform_(-0.5, 0.5)  # non-zero biases, as after training
        ref_module = TorchSqueezeExcitation(C, Q).double()
        ref_module.load_state_dict({n: t.double() for n, t in module.state_dict().items()})
        x = torch.randn(2, C, 9, 9, generator=torch.Generator().manual_seed(seed)).to(td)
        with torch.no_grad():
            ref = ref_module(x.double()).numpy()
            low = module(x).double().numpy()
        layer = se.load_state_dict({n: t.double().numpy() for n, t in module.state_dict().items()})
        out = np.asarray(run(layer, jnp.asarray(x.double().numpy(), dtype)), np.float64)
        err, err_torch = np.abs(out - ref).max(), np.abs(low - ref).max()
        assert err <= max(err_torch, float(jnp.finfo(dtype).eps) * np.abs(ref).max()), (seed, err, err_torch)
        worse += np.abs(out - ref).mean() > np.abs(low - ref).mean()
    assert worse <= 3, f"noxton less exact than torch (mean error) in {worse} of 10 draws"
