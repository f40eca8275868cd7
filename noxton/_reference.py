"""Plain NumPy references (float64) for the tour and for tests that run without torch.

Written from torch's documented semantics, independently of ``noxton.functional``.
"""

from __future__ import annotations

import numpy as np


def mha_reference(
    q, k, v, sd, num_heads, *, key_padding_mask=None, attn_mask=None, is_causal=False, add_zero_attn=False, average=True
):
    """torch MHA for unbatched ``(L, E)`` inputs and a torch ``state_dict`` of NumPy arrays."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    sd = {n: np.asarray(a, np.float64) for n, a in sd.items()}
    E = sd["out_proj.weight"].shape[0]
    if "in_proj_weight" in sd:
        wq, wk, wv = np.split(sd["in_proj_weight"], 3)
    else:
        wq, wk, wv = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
    bq, bk, bv = np.split(sd["in_proj_bias"], 3) if "in_proj_bias" in sd else (0.0, 0.0, 0.0)
    q, k, v = q @ wq.T + bq, k @ wk.T + bk, v @ wv.T + bv
    L, S = q.shape[0], k.shape[0]
    bias = np.zeros((num_heads, L, S))
    if key_padding_mask is not None:
        m = np.asarray(key_padding_mask)
        bias = bias + (np.where(m, -np.inf, 0.0) if m.dtype == bool else m)[None, None, :]
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        bias = bias + (np.where(m, -np.inf, 0.0) if m.dtype == bool else m)
    elif is_causal:
        bias = bias + np.where(np.triu(np.ones((L, S), bool), 1), -np.inf, 0.0)
    if "bias_k" in sd:
        k = np.concatenate([k, sd["bias_k"].reshape(1, E)])
        v = np.concatenate([v, sd["bias_v"].reshape(1, E)])
        bias = np.concatenate([bias, np.zeros((num_heads, L, 1))], -1)
    if add_zero_attn:
        k = np.concatenate([k, np.zeros((1, E))])
        v = np.concatenate([v, np.zeros((1, E))])
        bias = np.concatenate([bias, np.zeros((num_heads, L, 1))], -1)
    D = E // num_heads
    qh = q.reshape(L, num_heads, D).transpose(1, 0, 2)
    kh = k.reshape(-1, num_heads, D).transpose(1, 0, 2)
    vh = v.reshape(-1, num_heads, D).transpose(1, 0, 2)
    scores = qh @ kh.transpose(0, 2, 1) / np.sqrt(D) + bias
    with np.errstate(invalid="ignore"):
        m = scores.max(-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.exp(scores - m)
        s = e.sum(-1, keepdims=True)
        w = e / np.where(s == 0, 1.0, s)
    out = (w @ vh).transpose(1, 0, 2).reshape(L, E) @ sd["out_proj.weight"].T
    if "out_proj.bias" in sd:
        out = out + sd["out_proj.bias"]
    return out, (w.mean(0) if average else w)


def se_reference(x, sd, activation=lambda h: np.maximum(h, 0.0), scale_activation=lambda s: 1 / (1 + np.exp(-s))):
    """torchvision SqueezeExcitation for ``(C, H, W)`` input and a torch ``state_dict``."""
    x = np.asarray(x, np.float64)
    sd = {n: np.asarray(a, np.float64) for n, a in sd.items()}
    pooled = x.mean(axis=(-2, -1))
    h = activation(sd["fc1.weight"][:, :, 0, 0] @ pooled + sd["fc1.bias"])
    s = scale_activation(sd["fc2.weight"][:, :, 0, 0] @ h + sd["fc2.bias"])
    return x * s[:, None, None]
