"""Closed-form FLOPs and bytes of one forward + backward of each msn_fast.kernels op, and the time they bound.

`python -m msn_fast.check` prints, per kernel row, the least time any implementation could take on the
detected GPU: max(flops / peak FLOP/s, bytes / peak bandwidth) (the roofline model, Williams et al. 2009),
and the fraction of it a measured time reaches. FLOPs count the matmuls and the adds an op must do; bytes
are those of an ideal fused op: every input read once per pass and every output written once, at its
dtype (intermediates kept on chip). Peaks come from `msn_fast.flops.GPU_PEAKS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


def attention_cost(b: int, h: int, nq: int, nkv: int, d: int, elem: int) -> Cost:
    """Non-causal attention, q [B, H, Nq, D] against k, v [B, H, Nkv, D], `elem` bytes per element.

    Forward: 4·B·H·Nq·Nkv·D FLOPs (q kᵀ and p v); reads q, k, v, writes out and the fp32 log-sum-exp.
    Backward: 2.5x the forward FLOPs (FlashAttention-2's count: five matmuls of which one is recomputed);
    reads q, k, v, out, dout and the LSE, writes dq, dk, dv and reads/writes the fp32 row sums (delta).
    """
    bh = b * h
    fwd = Cost(4.0 * bh * nq * nkv * d, elem * bh * d * (2 * nq + 2 * nkv) + 4 * bh * nq)
    bwd = Cost(2.5 * fwd.flops, elem * bh * d * (4 * nq + 4 * nkv) + 3 * 4 * bh * nq)
    return fwd + bwd


def gather_tokens_cost(b: int, n: int, k: int, d: int, elem: int, idx_elem: int = 8, pos: bool = True) -> Cost:
    """Gather K of N rows of width D per sample (tokens [B, N, D], keep_idx [B, K]), plus pos_embed [N, D].

    Forward: B·K·D adds (the position embedding); reads the kept rows, the index and pos_embed, writes
    [B, K, D]. Backward: reads dout, writes dtokens in full ([B, N, D], zeros at dropped rows) and sums
    B·K·D values into d pos_embed (written in fp32).
    """
    rows, idx = b * k * d, b * k * idx_elem
    fwd = Cost(rows if pos else 0, elem * (2 * rows + (n * d if pos else 0)) + idx)
    bwd = Cost(rows if pos else 0, elem * (rows + b * n * d) + idx + (4 * n * d if pos else 0))
    return fwd + bwd


def embed_kept_patches_cost(b: int, c: int, p: int, k: int, d: int, n: int, elem: int, idx_elem: int = 8,
                            images_grad: bool = False) -> Cost:
    """Patch-embed K kept P x P patches of C channels per image (weight [D, C, P, P]) into [B, 1 + K, D].

    Forward: 2·B·K·D·C·P² (the GEMM) + 2·B·K·D (bias, position embedding); reads the kept pixels, the
    weight, bias, pos_embed [N, D] and the index, writes the tokens. Backward: the weight-gradient GEMM
    (2·B·K·D·C·P²) and B·K·D-sized sums for bias and pos_embed; reads dout and the kept pixels again, writes
    d weight, d bias, d pos_embed, d cls_token. With images_grad, one more GEMM and d images [B, C, H, W]
    (taken as N·P² pixels per channel). The trainer's images need no gradient.
    """
    kdim, rows = c * p * p, b * k * d
    fwd = Cost(2.0 * rows * kdim + 2 * rows,
               elem * (b * k * kdim + d * kdim + d + n * d + b * (1 + k) * d) + b * k * idx_elem)
    bwd = Cost(2.0 * rows * kdim + 2 * rows + b * d,
               elem * (b * (1 + k) * d + b * k * kdim + d * kdim + 2 * d + n * d) + b * k * idx_elem)
    if images_grad:
        bwd = bwd + Cost(2.0 * rows * kdim, elem * b * n * kdim)
    return fwd + bwd


def prototype_cross_entropy_cost(m: int, b: int, k: int, d: int, elem: int, target_elem: int = 4) -> Cost:
    """Prototype cross-entropy of M = V·B anchor rows of width d against K fp32 prototypes and targets [B, K].

    Forward: 2·M·K·d (the logit matmul; the softmax and the sums are O(M·K) and left out); reads anchor,
    prototypes and targets, writes the CE and the mean prediction [K] (fp32). Backward: d anchor and
    d prototypes, 2·M·K·d each; reads anchor, prototypes and targets again, writes d anchor and d prototypes
    (fp32). No gradient to the targets. (The targets themselves, B·K·d more, are msn_fast.loss's torch work.)
    """
    fwd = Cost(2.0 * m * k * d, elem * m * d + 4 * k * d + target_elem * b * k + 4 * (1 + k))
    bwd = Cost(4.0 * m * k * d, 2 * elem * m * d + 2 * 4 * k * d + target_elem * b * k)
    return fwd + bwd


def op_cost(op: str, kw: dict) -> Cost:
    """Cost of the op called with the public function's keyword arguments `kw` (those of check_op)."""
    if op == "attention":
        q, k = kw["q"], kw["k"]
        b, h, nq, d = q.shape
        return attention_cost(b, h, nq, k.shape[2], d, q.element_size())
    if op == "gather_tokens":
        t, idx = kw["tokens"], kw["keep_idx"]
        b, n, d = t.shape
        return gather_tokens_cost(b, n, idx.shape[-1], d, t.element_size(), idx.element_size(),
                                  kw.get("pos_embed") is not None)
    if op == "embed_kept_patches":
        x, w, idx = kw["images"], kw["weight"], kw["keep_idx"]
        b, c, hh, ww = x.shape
        p = w.shape[-1]
        return embed_kept_patches_cost(b, c, p, idx.shape[-1], w.shape[0], (hh // p) * (ww // p), x.element_size(),
                                       idx.element_size(), x.requires_grad)
    if op == "prototype_cross_entropy":
        a, t, pr = kw["anchor"], kw["targets"], kw["prototypes"]
        return prototype_cross_entropy_cost(a.shape[0], t.shape[0], pr.shape[0], a.shape[1], a.element_size(),
                                            t.element_size())
    raise ValueError(f"op_cost: unknown op {op!r}")


def time_bound(cost: Cost, peaks: tuple[float, float] | None) -> float | None:
    """max(flops / peak FLOP/s, bytes / peak B/s) in seconds; None without peaks (a CPU, an unknown GPU)."""
    if peaks is None:
        return None
    return max(cost.flops / peaks[0], cost.bytes / peaks[1])


def bound_applies(dtype: torch.dtype) -> bool:
    """The peak table holds dense bf16 FLOP/s: bounds are drawn for 16-bit rows only (fp32 runs IEEE dots)."""
    return dtype in (torch.bfloat16, torch.float16)
