"""CUDA kernels in Triton: activation-sparse FFN (exact or predicted), MoE FFN, n:m matmul (n:m:g uses the n:m one).

The MoE FFN (``ffn_moe``) takes each token's own experts (top-k or a
threshold: any number per token); ``ffn_sparse(ranges=...)`` computes one
set of neurons for every token.

Triton is optional (``pip install sparsify[triton]``, Linux only); without
it ``available()`` is False and the modules fall back (with a warning) to
dense compute. Every kernel matches its plain-torch reference
(``sparsify_kernels.ffn.ffn_reference``, ``F.linear`` on the dense weight);
the tests run them on the CPU under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .ffn import ACTIVATIONS, activation


def available() -> bool:
    """Triton is installed, and there is a GPU or the interpreter is on."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _impl():
    from . import _triton_impl
    return _triton_impl


def ffn_sparse(x, w_in, b_in, w_up, b_up, w_down_t, b_down, act="relu", threshold=0.0, cut=0.0,
               ranges=None, block_n: int = 64, block_d: int = 128) -> torch.Tensor:
    """The FFN over the listed neurons (all by default), reading up/down rows of non-zero activations only.

    Without ``ranges`` (activation sparsity) the gate is one dense product
    (cuBLAS); with ``ranges`` (experts) the gate rows are read for the listed
    neurons only, inside the kernel.
    """
    d = w_in.shape[1]
    x2 = x.reshape(-1, d).contiguous()
    if ranges is None:
        nidx = torch.arange(w_in.shape[0], device=x.device, dtype=torch.int32)
        gate = activation(act, torch.nn.functional.linear(x2, w_in, b_in).float(), threshold, cut).contiguous()
    else:
        from .ffn import neuron_index
        nidx = neuron_index(ranges).to(device=x.device, dtype=torch.int32)
        gate = None
    y = _ffn(x2, w_in, b_in, w_up, b_up, w_down_t, b_down, act, threshold, cut, nidx, gate, None, block_n, block_d)
    return y.to(x.dtype).reshape(*x.shape[:-1], d)


def ffn_predicted(x, w_in, b_in, w_up, b_up, w_down_t, b_down, act="relu", threshold=0.0, cut=0.0, *,
                  p_in, p_out, p_bias=None, p_threshold: float = 0.0, block_n: int = 64,
                  block_d: int = 128) -> torch.Tensor:
    """The FFN over the neurons a low-rank predictor chooses per token (``sparsify_kernels.ffn.predict``).

    The predictor's two small products run in torch; the kernel then reads
    the gate rows of the chosen neurons only (per token), and the up/down
    rows of those that turn out active.
    """
    from .ffn import predict

    d = w_in.shape[1]
    x2 = x.reshape(-1, d).contiguous()
    sel = predict(x2, p_in, p_out, p_bias, p_threshold)  # [T, d_ff]
    nidx = sel.any(0).nonzero().flatten()
    select = sel[:, nidx].to(torch.int8).contiguous()  # [T, n_listed]
    y = _ffn(x2, w_in, b_in, w_up, b_up, w_down_t, b_down, act, threshold, cut, nidx.to(torch.int32), None,
             select, block_n, block_d)
    return y.to(x.dtype).reshape(*x.shape[:-1], d)


def ffn_moe(x, w_in, b_in, w_up, b_up, w_down_t, b_down, act="relu", threshold=0.0, cut=0.0, *,
            experts, expert_size: int, block_n: int = 64, block_d: int = 128) -> torch.Tensor:
    """The FFN over each token's own selected experts (``experts`` boolean ``[..., E]``, any number per token).

    Lists the neurons of the experts some token selected; the kernel reads
    an expert's gate (fc1) and up rows only for the tokens that selected it,
    and its down rows only where its activation is non-zero
    (``sparsify_kernels.ffn.ffn_moe`` is the CPU kernel, ``ffn_reference``
    with ``select=expert_neurons(experts, expert_size)`` the definition).
    """
    d = w_in.shape[1]
    x2 = x.reshape(-1, d).contiguous()
    sel = experts.reshape(x2.shape[0], -1).to(device=x.device, dtype=torch.bool)
    listed = sel.any(0).nonzero().flatten()
    offsets = torch.arange(expert_size, device=x.device)
    nidx = (listed[:, None] * expert_size + offsets[None, :]).flatten()
    select = sel[:, listed].repeat_interleave(expert_size, dim=1).to(torch.int8).contiguous()  # [T, n_listed]
    y = _ffn(x2, w_in, b_in, w_up, b_up, w_down_t, b_down, act, threshold, cut, nidx.to(torch.int32), None,
             select, block_n, block_d)
    return y.to(x.dtype).reshape(*x.shape[:-1], d)


def _ffn(x2, w_in, b_in, w_up, b_up, w_down_t, b_down, act, threshold, cut, nidx, gate, select, block_n, block_d):
    """Launch the two kernels over the neurons ``nidx``: float32 ``[T, d]``."""
    import triton

    k = _impl()
    T, d = x2.shape
    n_sel = nidx.numel()
    y = torch.empty(T, d, device=x2.device, dtype=torch.float32)
    if n_sel == 0:
        y.zero_()
        if b_down is not None:
            y += b_down.float()
        return y
    x1 = torch.empty(T, n_sel, device=x2.device, dtype=torch.float32)
    dummy = x1
    k._ffn_rows[(triton.cdiv(n_sel, block_n), T)](
        x2, w_in, b_in if b_in is not None else dummy, w_up if w_up is not None else dummy,
        b_up if b_up is not None else dummy, gate if gate is not None else dummy, nidx,
        select if select is not None else nidx, x1, n_sel, d, float(threshold), float(cut),
        ACT=ACTIVATIONS[act], PRE_GATE=gate is not None, HAS_UP=w_up is not None,
        HAS_B_IN=b_in is not None, HAS_B_UP=b_up is not None, HAS_SEL=select is not None,
        BLOCK_N=block_n, BLOCK_D=block_d)
    k._ffn_down[(triton.cdiv(d, block_d), T)](
        x1, w_down_t, b_down if b_down is not None else dummy, nidx, y, n_sel, d,
        HAS_B=b_down is not None, BLOCK_N=block_n, BLOCK_D=block_d)
    return y


def nm_matmul(x, val, idx, n: int, m: int, n_in: int, bias=None, block_t: int = 16, block_o: int = 32,
              block_b: int = 8) -> torch.Tensor:
    """``x @ W.T + b`` for an n:m weight given as the layout's ``(val, idx)`` (``[out, blocks * n]``)."""
    import triton

    k = _impl()
    n_out = val.shape[0]
    n_blocks = val.shape[1] // n
    x2 = x.reshape(-1, n_in).contiguous()
    T = x2.shape[0]
    y = torch.empty(T, n_out, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(max(T, 1), block_t), triton.cdiv(n_out, block_o))
    k._nm_matmul[grid](x2, val.contiguous(), idx.contiguous(), bias if bias is not None else y, y,
                       T, n_out, n_in, n_blocks, N=n, M=m, HAS_B=bias is not None,
                       BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_B=block_b)
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)
