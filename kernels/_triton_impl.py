"""Triton kernels (imported lazily by ``triton_kernels``, so ``TRITON_INTERPRET`` can be set first).

- ``_ffn_rows``: for the listed neurons, the activation (from a precomputed
  gate, or computed here for experts and predicted neurons) and, only where
  it is non-zero, the up row's dot product: ``x1[t, j]``. Inactive rows are
  masked loads: never read. With ``HAS_SEL``, ``sel[t, n]`` (a predictor's
  choice, or a router's experts expanded to their neurons) masks the gate rows
  per token as well.
- ``_ffn_down``: ``y[t, d-slice] = sum_j x1[t, j] * W_down_t[j, d-slice]``,
  loading only rows with a non-zero ``x1``.
- ``_nm_matmul``: n:m weight tiles are expanded to dense in registers from
  values and positions (only compressed bytes are read), then ``tl.dot``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _act(v, ACT: tl.constexpr, threshold, cut):
    if ACT == 0:
        y = tl.where(v >= threshold, v, 0.0)
    elif ACT == 1:
        y = v * tl.sigmoid(v)
    elif ACT == 2:
        y = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    else:
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        y = 0.5 * v * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    return tl.where(tl.abs(y) >= cut, y, 0.0)


@triton.jit
def _ffn_rows(x_ptr, w_in_ptr, b_in_ptr, w_up_ptr, b_up_ptr, gate_ptr, nidx_ptr, sel_ptr, x1_ptr,
              n_sel, d, threshold, cut,
              ACT: tl.constexpr, PRE_GATE: tl.constexpr, HAS_UP: tl.constexpr,
              HAS_B_IN: tl.constexpr, HAS_B_UP: tl.constexpr, HAS_SEL: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, tok = tl.program_id(0), tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    listed = offs_n < n_sel
    if HAS_SEL:  # this token's predicted neurons among the listed ones
        in_range = listed & (tl.load(sel_ptr + tok * n_sel + offs_n, mask=listed, other=0) != 0)
    else:
        in_range = listed
    rows = tl.load(nidx_ptr + offs_n, mask=in_range, other=0).to(tl.int64)
    x_row = x_ptr + tok * d
    if PRE_GATE:
        h = tl.load(gate_ptr + tok * n_sel + offs_n, mask=in_range, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k in range(0, d, BLOCK_D):
            offs_d = k + tl.arange(0, BLOCK_D)
            xv = tl.load(x_row + offs_d, mask=offs_d < d, other=0.0).to(tl.float32)
            w = tl.load(w_in_ptr + rows[:, None] * d + offs_d[None, :],
                        mask=in_range[:, None] & (offs_d[None, :] < d), other=0.0).to(tl.float32)
            acc += tl.sum(w * xv[None, :], axis=1)
        if HAS_B_IN:
            acc += tl.load(b_in_ptr + rows, mask=in_range, other=0.0).to(tl.float32)
        h = tl.where(in_range, _act(acc, ACT, threshold, cut), 0.0)
    if HAS_UP:
        live = in_range & (h != 0.0)
        acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k in range(0, d, BLOCK_D):
            offs_d = k + tl.arange(0, BLOCK_D)
            xv = tl.load(x_row + offs_d, mask=offs_d < d, other=0.0).to(tl.float32)
            w = tl.load(w_up_ptr + rows[:, None] * d + offs_d[None, :],
                        mask=live[:, None] & (offs_d[None, :] < d), other=0.0).to(tl.float32)
            acc_u += tl.sum(w * xv[None, :], axis=1)
        if HAS_B_UP:
            acc_u += tl.load(b_up_ptr + rows, mask=live, other=0.0).to(tl.float32)
        h = h * acc_u
    tl.store(x1_ptr + tok * n_sel + offs_n, h, mask=listed)


@triton.jit
def _ffn_down(x1_ptr, w_t_ptr, b_ptr, nidx_ptr, y_ptr, n_sel, d,
              HAS_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, tok = tl.program_id(0), tl.program_id(1)
    offs_d = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(0, n_sel, BLOCK_N):
        offs_n = k + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_sel
        v = tl.load(x1_ptr + tok * n_sel + offs_n, mask=n_ok, other=0.0)
        live = n_ok & (v != 0.0)
        rows = tl.load(nidx_ptr + offs_n, mask=n_ok, other=0).to(tl.int64)
        w = tl.load(w_t_ptr + rows[:, None] * d + offs_d[None, :], mask=live[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * v[:, None], axis=0)
    if HAS_B:
        acc += tl.load(b_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + tok * d + offs_d, acc, mask=d_ok)


@triton.jit
def _nm_matmul(x_ptr, val_ptr, idx_ptr, b_ptr, y_ptr, T, n_out, n_in, n_blocks,
               N: tl.constexpr, M: tl.constexpr, HAS_B: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_B: tl.constexpr):
    pid_t, pid_o = tl.program_id(0), tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    t_ok, o_ok = offs_t < T, offs_o < n_out
    acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    row_len = n_blocks * N
    slot = tl.arange(0, N)
    col_in_block = tl.arange(0, M)
    for b0 in range(0, n_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_ok = offs_b < n_blocks
        # compressed tile [BLOCK_O, BLOCK_B, N]: values and their positions inside each block of M
        comp = offs_o[:, None, None] * row_len + offs_b[None, :, None] * N + slot[None, None, :]
        c_ok = o_ok[:, None, None] & b_ok[None, :, None]
        v = tl.load(val_ptr + comp, mask=c_ok, other=0.0).to(tl.float32)
        p = tl.load(idx_ptr + comp, mask=c_ok, other=0).to(tl.int32)
        # expand to dense [BLOCK_O, BLOCK_B, M] in registers
        hit = p[:, :, :, None] == col_in_block[None, None, None, :]
        dense = tl.sum(tl.where(hit, v[:, :, :, None], 0.0), axis=2)
        dense = tl.reshape(dense, [BLOCK_O, BLOCK_B * M])
        cols = b0 * M + tl.arange(0, BLOCK_B * M)
        xt = tl.load(x_ptr + offs_t[:, None] * n_in + cols[None, :],
                     mask=t_ok[:, None] & (cols[None, :] < n_in), other=0.0).to(tl.float32)
        acc += tl.dot(xt, tl.trans(dense), input_precision="ieee")  # exact fp32, not TF32
    if HAS_B:
        acc += tl.load(b_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * n_out + offs_o[None, :], acc, mask=t_ok[:, None] & o_ok[None, :])
