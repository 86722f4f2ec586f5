"""The reference attention backend: plain PyTorch, the semantics every kernel must match.

Shapes: T packed tokens, B sequences, H query heads, K = Hkv key/value heads, G = H // K query
heads per key/value head, D head dim, Lq / Lk the longest query / key sequence in the batch.

Query head h reads key/value head h // G. For sequence b with lq query and lk key tokens, query
i sees key j when
    not causal:   always
    causal:       j <= i + (lk - lq)           (bottom-right aligned, as flash-attn >= 2.1)
    + prefix p:   j < p  or  j <= i + (lk - lq)
A query that sees no key returns zeros and lse = -inf. Computation is in fp32 (fp64 for fp64
inputs) on a padded (B, K, G, Lq, Lk) score tensor, autocast or not; outputs come back in the
input dtype.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def exact(fn):
    """Runs fn (whose first argument is a tensor) with autocast off on that tensor's device, so a
    reference computes in the dtypes it names, not in autocast's lower precision."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = args[0].device.type
        if not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def visible_mask(lens_q: Tensor, lens_k: Tensor, max_q: int, max_k: int, causal: bool,
                 prefix_lens: Tensor | None) -> Tensor:
    """(B, Lq, Lk) bool: which key each query of each sequence may attend to (padding excluded)."""
    i = torch.arange(max_q, device=lens_q.device)[None, :, None]
    j = torch.arange(max_k, device=lens_q.device)[None, None, :]
    lq, lk = lens_q[:, None, None], lens_k[:, None, None]
    mask = (i < lq) & (j < lk)
    if causal:
        allowed = j <= i + (lk - lq)
        if prefix_lens is not None:
            allowed = allowed | (j < prefix_lens.long()[:, None, None])
        mask = mask & allowed
    return mask


class _Padded:
    """Index maps between a packed (T, ...) stream and a padded (B, L, ...) batch."""

    def __init__(self, cu_seqlens: Tensor):
        starts = cu_seqlens[:-1].long()
        self.lens = cu_seqlens[1:].long() - starts
        self.max_len = int(self.lens.max()) if self.lens.numel() else 0
        ar = torch.arange(self.max_len, device=cu_seqlens.device)
        self.valid = ar[None, :] < self.lens[:, None]  # (B, L)
        self.index = torch.where(self.valid, starts[:, None] + ar[None, :], 0)  # (B, L)

    def gather(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """(T, ...) -> (B, L, ...) in `dtype`, zeros at padding."""
        if x.shape[0] == 0:
            return x.new_zeros(self.index.shape + x.shape[1:], dtype=dtype)
        out = x.to(dtype)[self.index]
        return torch.where(self.valid.view(self.valid.shape + (1,) * (x.dim() - 1)), out, 0.0)

    def scatter(self, x_pad: Tensor, total: int) -> Tensor:
        """(B, L, ...) -> (T, ...), dropping padding."""
        out = x_pad.new_zeros((total,) + x_pad.shape[2:])
        out[self.index[self.valid]] = x_pad[self.valid]
        return out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q, k, cu_q, cu_k, scale, causal, prefix_lens):
    """Padded maps, fp32 q/k, the (B, K, G, Lq, Lk) masked scores and the (B, Lq, Lk) mask."""
    h, hkv = q.shape[1], k.shape[1]
    cdt = _compute_dtype(q.dtype)
    pq, pk = _Padded(cu_q), _Padded(cu_k)
    q_BQKGD = pq.gather(q, cdt).unflatten(2, (hkv, h // hkv))
    k_BLKD = pk.gather(k, cdt)
    mask_BQL = visible_mask(pq.lens, pk.lens, pq.max_len, pk.max_len, causal, prefix_lens)
    s_BKGQL = torch.einsum("bqhgd,bkhd->bhgqk", q_BQKGD, k_BLKD) * scale
    s_BKGQL = s_BKGQL.masked_fill(~mask_BQL[:, None, None], float("-inf"))
    return pq, pk, q_BQKGD, k_BLKD, s_BKGQL, mask_BQL


def _probs(s_BKGQL: Tensor, lse_BKGQ: Tensor) -> Tensor:
    # Rows with no visible key have lse = -inf; shifting them by 0 keeps exp(-inf) = 0, not NaN.
    return torch.exp(s_BKGQL - torch.where(torch.isneginf(lse_BKGQ), 0.0, lse_BKGQ)[..., None])


@exact
def attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                      max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
                      prefix_lens: Tensor | None) -> tuple[Tensor, Tensor]:
    """q (Tq, H, D), k/v (Tk, K, D) -> out (Tq, H, D) in q's dtype, lse (H, Tq) fp32."""
    tq, h, d = q.shape
    pq, pk, _, _, s_BKGQL, _ = _scores(q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, prefix_lens)
    v_BLKD = pk.gather(v, s_BKGQL.dtype)
    lse_BKGQ = torch.logsumexp(s_BKGQL, dim=-1)
    p_BKGQL = _probs(s_BKGQL, lse_BKGQ)
    o_BQKGD = torch.einsum("bhgqk,bkhd->bqhgd", p_BKGQL, v_BLKD)
    out = pq.scatter(o_BQKGD.flatten(2, 3), tq).to(q.dtype)
    lse_BQH = lse_BKGQ.flatten(1, 2).transpose(1, 2)
    lse = torch.full((tq, h), float("-inf"), dtype=lse_BQH.dtype, device=q.device)
    lse[pq.index[pq.valid]] = lse_BQH[pq.valid]
    return out, lse.t().contiguous()


@exact
def attention_backward(dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                       lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                       max_seqlen_k: int, softmax_scale: float, causal: bool,
                       prefix_lens: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) in the inputs' dtypes; dlse (H, Tq) is the gradient of lse, or None.

    With P = softmax(S), dS = P * (dP - delta) where delta_i = sum_d dO_id O_id - dlse_i.
    """
    tq, h, d = q.shape
    hkv = k.shape[1]
    pq, pk, q_BQKGD, k_BLKD, s_BKGQL, _ = _scores(q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, prefix_lens)
    cdt = s_BKGQL.dtype
    v_BLKD = pk.gather(v, cdt)
    to_BKGQ = lambda x_TH: pq.gather(x_TH, cdt).unflatten(2, (hkv, h // hkv)).permute(0, 2, 3, 1)
    lse_BKGQ = to_BKGQ(lse.t()).masked_fill(~pq.valid[:, None, None], float("-inf"))
    p_BKGQL = _probs(s_BKGQL, lse_BKGQ)
    do_BQKGD = pq.gather(dout, cdt).unflatten(2, (hkv, h // hkv))
    o_BQKGD = pq.gather(out, cdt).unflatten(2, (hkv, h // hkv))
    delta_BKGQ = (do_BQKGD * o_BQKGD).sum(-1).permute(0, 2, 3, 1)
    if dlse is not None:
        delta_BKGQ = delta_BKGQ - to_BKGQ(dlse.t())
    dv_BLKD = torch.einsum("bhgqk,bqhgd->bkhd", p_BKGQL, do_BQKGD)
    dp_BKGQL = torch.einsum("bqhgd,bkhd->bhgqk", do_BQKGD, v_BLKD)
    ds_BKGQL = p_BKGQL * (dp_BKGQL - delta_BKGQ[..., None]) * softmax_scale
    dq_BQKGD = torch.einsum("bhgqk,bkhd->bqhgd", ds_BKGQL, k_BLKD)
    dk_BLKD = torch.einsum("bhgqk,bqhgd->bkhd", ds_BKGQL, q_BQKGD)
    dq = pq.scatter(dq_BQKGD.flatten(2, 3), tq).to(q.dtype)
    dk = pk.scatter(dk_BLKD, k.shape[0]).to(k.dtype)
    dv = pk.scatter(dv_BLKD, v.shape[0]).to(v.dtype)
    return dq, dk, dv
