"""Greedy and beam-search decoding, with a KV cache or by full recompute (the two agree token
for token; the recompute path exists to prove it).

Shapes: B examples, W beams, N = B*W decoding rows, s tokens decoded so far, V vocabulary.
Beams are scored by the sum of token log-probabilities (no length penalty); greedy is beam
search with W = 1. A finished row (it emitted eos) only extends with eos at no cost.
"""

from __future__ import annotations

import torch
from torch import Tensor

from generalist._fields import check_count
from generalist.data.packing import EncodedExample
from generalist.modules.attention import reorder_cache
from generalist.modules.blocks import StreamInfo


def _repeat_stream(model, h_SM: Tensor, enc: StreamInfo, w: int) -> tuple[Tensor, StreamInfo]:
    """Each example's encoder tokens repeated w times, so every beam has its own sequence."""
    lens = (enc.cu_seqlens[1:] - enc.cu_seqlens[:-1]).tolist()
    starts = enc.cu_seqlens[:-1].tolist()
    idx = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens) for _ in range(w)]).to(h_SM.device)
    cu = torch.zeros(len(lens) * w + 1, dtype=torch.int32)
    cu[1:] = torch.tensor([n for n in lens for _ in range(w)]).cumsum(0)
    return h_SM[idx], model._stream(cu.to(h_SM.device), enc.max_seqlen, enc.task_ids[idx], enc.modality_ids[idx])


class NonFiniteError(ValueError):
    """The model's activations are not finite for `examples` (numbers within the batch)."""

    def __init__(self, examples: list[int]):
        self.examples = examples
        super().__init__(f"the model's activations are not finite for example(s) {examples[:5]}"
                         f"{' ...' if len(examples) > 5 else ''}: input values too large for it (or outside the "
                         "range it was trained on)")

    def shifted(self, first: int) -> "NonFiniteError":
        """The same error for a batch that starts at example `first` of a longer list."""
        return NonFiniteError([first + e for e in self.examples])


def check_finite_stream(x_SM, cu_seqlens) -> None:
    """A NonFiniteError (a ValueError) naming the examples of a packed stream (or of rows,
    cu_seqlens None) whose values are not finite: inputs too large for the model overflow it, and
    a prediction made from NaN would look like an empty answer. One device sync."""
    bad_S = ~torch.isfinite(x_SM).all(dim=-1)
    if not bool(bad_S.any()):
        return
    if cu_seqlens is None:
        examples = bad_S.nonzero().flatten().tolist()
    else:
        starts = cu_seqlens[:-1].long()
        examples = sorted(set((torch.searchsorted(starts, bad_S.nonzero().flatten(), right=True) - 1).tolist()))
    raise NonFiniteError(examples)


@torch.no_grad()
def generate(model, batch: list[EncodedExample], max_new_tokens: int = 32, beam_size: int = 1,
             use_cache: bool = True) -> list[list[int]]:
    """Token ids generated for each example (without bos, cut before the first eos). The model
    decodes in eval mode (no capacity dropping in its MoE layers, which would make the answer
    depend on the batch) and is left in the mode it came in. The decoder reads at most the text
    embedder's max_len tokens (bos and all but the last one generated), so max_new_tokens is at
    most that. A beam search answers with the highest sum of token log-probabilities among its
    final beams and every hypothesis that finished on the way. Activations that are not finite
    (in the encoder, or the decoder's logits) raise a NonFiniteError naming the examples."""
    check_count("beam_size", beam_size)
    check_count("max_new_tokens", max_new_tokens, 0)
    max_len = model.embedders["text"].cfg.max_len
    if max_new_tokens > max_len:
        raise ValueError(f"max_new_tokens is {max_new_tokens}, but the decoder reads at most the text embedder's "
                         f"max_len of {max_len} tokens: ask for at most {max_len}")
    if not batch:
        return []
    training = model.training
    model.eval()
    try:
        return _generate(model, batch, max_new_tokens, beam_size, use_cache)
    finally:
        model.train(training)


def _generate(model, batch: list[EncodedExample], max_new_tokens: int, beam_size: int,
              use_cache: bool) -> list[list[int]]:
    cfg = model.cfg
    b, w, v = len(batch), beam_size, cfg.vocab_size
    device = model.boundary.device
    h_SM, enc, _ = model.encode(batch)
    check_finite_stream(h_SM, enc.cu_seqlens)
    h_SM, enc = _repeat_stream(model, h_SM, enc, w)
    task_N = torch.tensor([ex.task_id for ex in batch for _ in range(w)], device=device)
    text_N = torch.zeros_like(task_N)  # modality id of the decoded tokens (text), made once: see cu_N
    tokens_Ns = torch.full((b * w, 1), cfg.bos_id, dtype=torch.long, device=device)
    scores_BW = torch.full((b, w), float("-inf"), device=device)
    scores_BW[:, 0] = 0.0
    finished_N = torch.zeros(b * w, dtype=torch.bool, device=device)
    done_V = torch.full((v,), float("-inf"), device=device)  # the log-probs of a finished row
    done_V[cfg.eos_id] = 0.0
    bad_N = torch.zeros(b * w, dtype=torch.bool, device=device)  # rows whose logits were not finite
    # each example's best finished hypothesis so far (its tokens, bos dropped, eos-padded): a
    # finished beam can be pushed out by unfinished ones that end up scoring less than it
    best_done_B = torch.full((b,), float("-inf"), device=device)
    best_done_Bs = torch.full((b, max_new_tokens), cfg.eos_id, dtype=torch.long, device=device)
    cu_N = torch.arange(b * w + 1, dtype=torch.int32, device=device)  # one query per row, shared by the layers
    caches = ([{"memory": blk.cross.memory(h_SM), "capacity": max_new_tokens, "cu_q": cu_N} for blk in model.decoder]
              if use_cache else None)

    for step in range(max_new_tokens):
        if use_cache:
            # the embedding table directly: the ids come from topk (nothing to check, which would
            # be a device sync), and the N rows are N sequences, not one text of N tokens
            x_NM = model.embedders["text"].embed(tokens_Ns[:, -1])
            pos_N = torch.full((b * w,), step, device=device)
            for blk, cache in zip(model.decoder, caches):
                x_NM = blk.step(x_NM, pos_N, task_N, text_N, cache, enc)
            logits_NV = model.dec_norm(x_NM) @ model.embedders["text"].weight.t()
        else:
            ids_T, dec = model._decoder_stream([[s] for s in tokens_Ns], task_N.tolist())
            logits_TV, _ = model.decode(ids_T, dec, h_SM, enc)
            logits_NV = logits_TV[dec.cu_seqlens[1:].long() - 1]
        bad_N |= ~finished_N & ~torch.isfinite(logits_NV).all(dim=-1)  # (read once, after the loop: no sync)
        # finished rows may only add eos, at no cost (torch.where: a boolean index would sync on a GPU)
        logp_NV = torch.where(finished_N[:, None], done_V, torch.log_softmax(logits_NV.float(), dim=-1))
        cand_BX = (scores_BW[:, :, None] + logp_NV.view(b, w, v)).view(b, w * v)
        scores_BW, flat_BW = cand_BX.topk(w, dim=-1)
        origin_N = (torch.arange(b, device=device)[:, None] * w + flat_BW // v).flatten()
        token_N = (flat_BW % v).flatten()
        tokens_Ns = torch.cat([tokens_Ns[origin_N], token_N[:, None]], dim=1)
        finished_N = finished_N[origin_N] | (token_N == cfg.eos_id)
        if w > 1:  # (one beam: a finished row stays, adding eos at no cost)
            top_B, beam_B = torch.where(finished_N.view(b, w), scores_BW, float("-inf")).max(dim=-1)
            better_B = top_B > best_done_B
            best_done_B = torch.where(better_B, top_B, best_done_B)
            rows_Bs = tokens_Ns.view(b, w, -1)[torch.arange(b, device=device), beam_B, 1:]
            best_done_Bs[:, :step + 1] = torch.where(better_B[:, None], rows_Bs, best_done_Bs[:, :step + 1])
        if use_cache and w > 1:  # beams of one example share its encoder memory; only self-attn reorders
            for cache in caches:
                reorder_cache(cache, origin_N)
        if finished_N.all():
            break

    if bool(bad_N.any()):  # the decoder overflowed: NaN logits would decode as an empty (or bos-only) answer
        raise NonFiniteError(bad_N.view(b, w).any(dim=1).nonzero().flatten().tolist())
    best_B = scores_BW.argmax(dim=-1)
    from_done_B = (best_done_B >= scores_BW.max(dim=-1).values).tolist()
    out = []
    for i in range(b):
        row = best_done_Bs[i].tolist() if from_done_B[i] else tokens_Ns[i * w + best_B[i], 1:].tolist()
        out.append(row[:row.index(cfg.eos_id)] if cfg.eos_id in row else row)
    return out
