"""MultiheadAttention against real torch, through the public API, both front ends.

Every case loads a randomised torch module's ``state_dict`` into noxton with
``load_state_dict`` / ``state_dict_to_params``, runs the same inputs and masks,
and compares outputs, weights (averaged and per head) and the gradients with
respect to the inputs and every parameter, by torch name.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    MHA_RUNNERS,
    assert_close,
    grid,
    random_bool_mask,
    random_float_mask,
    requires_torch,
    torch,
    torch_mha,
)

pytestmark = requires_torch

E, H, N = 8, 2, 2
MASKS = [
    "none",
    "kpm_bool",
    "kpm_float",
    "attn_bool",
    "attn_float",
    "heads_bool",
    "heads_float",
    "both_bool",
    "both_float",
    "causal",
    "causal_kpm",
    "causal_with_mask",
]
STRUCTS = grid(bias=[True, False], add_bias_kv=[False, True], add_zero_attn=[False, True], dims=["self", "cross", "kv"])


def struct_id(s):
    return "-".join(
        [s["dims"], "bias" if s["bias"] else "nobias"]
        + (["biaskv"] if s["add_bias_kv"] else [])
        + (["zeroattn"] if s["add_zero_attn"] else [])
    )


def make_case(struct, mask_case, np_dtype, seed=0):
    """Config, inputs and masks (NumPy) for one parity case."""
    rng = np.random.default_rng(seed)
    kdim, vdim = (5, 7) if struct["dims"] == "kv" else (E, E)
    L = 4
    S = L if struct["dims"] == "self" else 5
    cfg = dict(
        embed_dim=E,
        num_heads=H,
        bias=struct["bias"],
        add_bias_kv=struct["add_bias_kv"],
        add_zero_attn=struct["add_zero_attn"],
        kdim=kdim,
        vdim=vdim,
    )
    q = rng.normal(size=(N, L, E)).astype(np_dtype)
    if struct["dims"] == "self":
        k = v = None  # self-attention: the same array is passed as query, key and value
    else:
        k = rng.normal(size=(N, S, kdim)).astype(np_dtype)
        v = rng.normal(size=(N, S, vdim)).astype(np_dtype)
    kpm = attn = None
    is_causal = False
    kind = "bool" if "bool" in mask_case else "float"
    gen = random_bool_mask if kind == "bool" else random_float_mask
    if mask_case.startswith("kpm") or mask_case.startswith("both") or mask_case == "causal_kpm":
        kpm = random_bool_mask(rng, (N, S)) if mask_case == "causal_kpm" else gen(rng, (N, S))
    if mask_case.startswith("attn") or mask_case.startswith("both"):
        attn = gen(rng, (L, S))
    if mask_case.startswith("heads"):
        attn = gen(rng, (H, L, S))
    if mask_case.startswith("causal"):
        is_causal = True
    if mask_case == "causal_with_mask":
        attn = np.triu(np.ones((L, S), bool), k=1)
    # float masks in the inputs' dtype, as torch requires
    kpm, attn = (m.astype(np_dtype) if m is not None and m.dtype != bool else m for m in (kpm, attn))
    return cfg, dict(q=q, k=k, v=v, kpm=kpm, attn=attn, is_causal=is_causal, L=L, S=S)


def torch_run(cfg, case, need_weights, average, tdtype):
    """torch outputs and gradients for loss = <out, R1> + <weights, R2>."""
    tm = torch_mha(cfg, tdtype)
    t = lambda a: None if a is None else torch.tensor(a)  # noqa: E731
    q = t(case["q"]).requires_grad_()
    if case["k"] is None:
        k = v = q
    else:
        k, v = t(case["k"]).requires_grad_(), t(case["v"]).requires_grad_()
    attn = t(case["attn"])
    if case["is_causal"] and attn is None:
        # torch needs the mask spelled out (it raises on is_causal alone).
        attn = torch.triu(torch.ones(case["L"], case["S"], dtype=torch.bool), diagonal=1)
    if attn is not None and attn.dim() == 3:
        attn = attn.repeat(N, 1, 1)  # torch's batched per-head layout is (N*H, L, S)
    out, w = tm(
        q,
        k,
        v,
        key_padding_mask=t(case["kpm"]),
        need_weights=need_weights,
        attn_mask=attn,
        average_attn_weights=average,
    )
    rng = np.random.default_rng(1)
    r_out = torch.tensor(rng.normal(size=tuple(out.shape)).astype(case["q"].dtype))
    loss = (out * r_out).sum()
    r_w = None
    if w is not None:
        r_w = torch.tensor(rng.normal(size=tuple(w.shape)).astype(case["q"].dtype))
        loss = loss + (w * r_w).sum()
    loss.backward()
    grads = {"query": q.grad.numpy()}
    if k is not q:
        grads.update(key=k.grad.numpy(), value=v.grad.numpy())
    grads.update({f"param.{n}": p.grad.numpy() for n, p in tm.named_parameters()})
    return (
        tm.state_dict(),
        out.detach().numpy(),
        None if w is None else w.detach().numpy(),
        grads,
        r_out.numpy(),
        None if r_w is None else r_w.numpy(),
    )


WEIGHT_MODES = [(True, True), (True, False), (False, True)]


def check_case(front, struct, mask_case, np_dtype, tdtype, atol, grad_atol, modes=WEIGHT_MODES, implementation="auto"):
    cfg, case = make_case(struct, mask_case, np_dtype)
    for need_weights, average in modes:
        sd, t_out, t_w, t_grads, r_out, r_w = torch_run(cfg, case, need_weights, average, tdtype)
        call = dict(
            need_weights=need_weights,
            average_attn_weights=average,
            is_causal=case["is_causal"],
            implementation=implementation,
        )
        out, w, grads = MHA_RUNNERS[front](
            cfg, sd, np_dtype, *(case[n] for n in ("q", "k", "v", "kpm", "attn")), call, r_out, r_w
        )
        tag = f"need_weights={need_weights} average={average}"
        assert_close(out, t_out, atol, f"output ({tag})")
        if need_weights:
            assert_close(w, t_w, atol, f"weights ({tag})")
        else:
            assert w is None
        assert sorted(grads) == sorted(t_grads)
        for name in t_grads:
            assert_close(grads[name], t_grads[name], grad_atol, f"grad {name} ({tag})")


@pytest.mark.cross_product
@pytest.mark.parametrize("mask_case", MASKS)
@pytest.mark.parametrize("struct", STRUCTS, ids=struct_id)
@pytest.mark.parametrize("front", ["equinox", "haiku"])
def test_parity_float32(front, struct, mask_case):
    check_case(front, struct, mask_case, np.float32, torch.float32, 1e-5, 1e-4)


@pytest.mark.cross_product
@pytest.mark.parametrize("mask_case", ["none", "both_bool", "heads_float", "causal_kpm"])
@pytest.mark.parametrize("struct", STRUCTS, ids=struct_id)
@pytest.mark.parametrize("front", ["equinox", "haiku"])
def test_parity_float64(front, struct, mask_case, x64):
    check_case(front, struct, mask_case, np.float64, torch.float64, 1e-10, 1e-10)


@pytest.mark.cross_product
@pytest.mark.parametrize("implementation", ["blockwise", "fused"])
@pytest.mark.parametrize("mask_case", ["both_float", "heads_bool", "causal_kpm"])
@pytest.mark.parametrize("struct", STRUCTS, ids=struct_id)
def test_parity_forced_paths(struct, mask_case, implementation):
    """The memory-efficient and fused paths (need_weights=False) against torch too, not only against dense."""
    check_case(
        "equinox",
        struct,
        mask_case,
        np.float32,
        torch.float32,
        1e-5,
        1e-4,
        modes=[(False, True)],
        implementation=implementation,
    )
