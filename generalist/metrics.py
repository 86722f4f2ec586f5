"""Evaluation metrics: exact-match accuracy, macro F1, corpus BLEU, CIDEr-D and recall@k.

Everything is implemented here from the published definitions (cited per function); there is
no dependency on nltk, sacrebleu or pycocoevalcap. Text metrics take plain strings and
tokenize them with `tokenize`; `recall_at_k` takes embeddings.

Text handling: `normalize_text` lower-cases, collapses whitespace and drops one trailing
period; `tokenize` then splits off the punctuation marks . , ! ? ; : ' " ( ) as tokens of
their own. BLEU scores these tokens (close to sacrebleu's 13a tokenizer, which also splits off
"-", "/" and a few more; on text with those the two differ); CIDEr-D drops the punctuation
tokens, as the coco-caption pipeline does with its PTB tokenizer before scoring.

Shapes: Q queries, B a block of queries, G gallery items, E embedding dim.

Errors a caller can cause (mismatched lengths, empty inputs, an empty reference list, a
positive index outside the gallery) raise ValueError with a message saying what was wrong.
"""

from __future__ import annotations

import math
import operator
import re
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

PUNCTUATION = ".,!?;:'\"()"
_PUNCT_RE = re.compile("([" + re.escape(PUNCTUATION) + "])")
_SMOOTH_EPSILON = 0.1  # Chen & Cherry (2014), method 1
_QUERY_BLOCK = 1024
_SIM_GRID = float(2**24)  # recall_at_k compares cosines rounded to multiples of 2^-24


# ---------------------------------------------------------------------------------------------
# Text normalization
# ---------------------------------------------------------------------------------------------


def normalize_text(s: str) -> str:
    """Lower-case, collapse runs of whitespace to one space, strip, and drop one trailing period
    ("A  Dog." -> "a dog")."""
    if not isinstance(s, str):
        raise TypeError(f"expected a str, got {type(s).__name__}")
    s = " ".join(s.lower().split())
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def tokenize(s: str) -> list[str]:
    """`normalize_text`, then split on whitespace with each of . , ! ? ; : ' " ( ) as a token of
    its own ("Hi, (you)!" -> ["hi", ",", "(", "you", ")", "!"])."""
    return _PUNCT_RE.sub(r" \1 ", normalize_text(s)).split()


def check_pairs(predictions: Sequence, references: Sequence, what: str, reference_strings: bool = True) -> None:
    """Predictions and references a score can pair: as many of each, at least one, every
    prediction (and, with `reference_strings`, every reference) a str; else a ValueError that
    starts with `what`."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError(f"{what}: pass lists of strings, not a single str")
    if len(predictions) != len(references):
        raise ValueError(
            f"{what}: got {len(predictions)} predictions but {len(references)} references"
        )
    if len(predictions) == 0:
        raise ValueError(f"{what}: no predictions to score")
    _check_strings(predictions, "predictions", what)
    if reference_strings:
        _check_strings(references, "references", what)


def _check_strings(items: Sequence, name: str, what: str) -> None:
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise ValueError(f"{what}: {name}[{i}] is {type(s).__name__} {s!r}, expected a str")


def _check_reference_sets(
    candidates: Sequence[str], references: Sequence[Sequence[str]], what: str
) -> None:
    check_pairs(candidates, references, what, reference_strings=False)
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise ValueError(
                f"{what}: references[{i}] is a str; "
                "each candidate needs a list of reference strings"
            )
        if len(refs) == 0:
            raise ValueError(f"{what}: references[{i}] is empty; every candidate needs a reference")
        _check_strings(refs, f"references[{i}]", what)


# ---------------------------------------------------------------------------------------------
# Classification-style metrics
# ---------------------------------------------------------------------------------------------


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after `normalize_text` (exact match)."""
    check_pairs(predictions, references, "accuracy")
    hits = sum(normalize_text(p) == normalize_text(r) for p, r in zip(predictions, references))
    return hits / len(predictions)


def accuracy_by(
    predictions: Sequence[str], references: Sequence[str], groups: Sequence[Hashable]
) -> dict[Hashable, float]:
    """`accuracy` within each group (e.g. question type), keyed by group in order of first
    appearance."""
    check_pairs(predictions, references, "accuracy_by")
    if len(groups) != len(predictions):
        raise ValueError(
            f"accuracy_by: got {len(groups)} groups for {len(predictions)} predictions"
        )
    hits: dict[Hashable, int] = {}
    totals: dict[Hashable, int] = {}
    for p, r, g in zip(predictions, references, groups):
        totals[g] = totals.get(g, 0) + 1
        hits[g] = hits.get(g, 0) + int(normalize_text(p) == normalize_text(r))
    return {g: hits[g] / totals[g] for g in totals}


def macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Unweighted mean over labels of F1 = 2 TP / (2 TP + FP + FN), labels compared after
    `normalize_text`. The labels are those seen in references or predictions, as in
    scikit-learn's `f1_score(average="macro")`, so a label that is only ever predicted counts
    with F1 = 0."""
    check_pairs(predictions, references, "macro_f1")
    preds = [normalize_text(p) for p in predictions]
    refs = [normalize_text(r) for r in references]
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for p, r in zip(preds, refs):
        if p == r:
            tp[p] += 1
        else:
            fp[p] += 1
            fn[r] += 1
    labels = set(preds) | set(refs)
    return sum(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in labels) / len(labels)


# ---------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------


def _ngram_counts(tokens: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    return Counter(
        tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1)
    )


def bleu(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = 4,
    smooth: bool = False,
) -> float:
    """Corpus-level BLEU in [0, 1] (Papineni, Roukos, Ward & Zhu, "BLEU: a Method for Automatic
    Evaluation of Machine Translation", ACL 2002).

    candidates[i] is scored against the list references[i]. For each order n = 1..max_n the
    modified precision is p_n = sum_i sum_g min(count_i(g), max_r count_r(g)) / sum_i #n-grams_i
    (counts clipped by the largest count in any one reference, then summed over the corpus, not
    averaged over sentences). BLEU = BP * exp(sum_n log(p_n) / max_n), with the brevity penalty
    BP = 1 if c > r else exp(1 - r / c), where c is the total candidate length and r the sum
    over candidates of the reference length closest to the candidate's length (ties go to the
    shorter reference, as in the original IBM scorer and coco-caption's "closest"). An empty
    corpus of candidate tokens (c = 0) scores 0.

    Without smoothing any p_n = 0 makes BLEU 0. With `smooth=True`:
    - an order with n-grams but no clipped match uses p_n = 0.1 / #n-grams: method 1 of Chen &
      Cherry, "A Systematic Comparison of Smoothing Techniques for Sentence-Level BLEU", WMT 2014
      (epsilon = 0.1, as NLTK's SmoothingFunction.method1);
    - an order no candidate is long enough to have is left out of the mean (sacrebleu's
      "effective order"), so captions shorter than max_n words that equal their references
      score 1, not 0.1^(missing orders / max_n);
    - no unigram match at all is still 0, as in NLTK and sacrebleu.
    Orders with matches are unchanged. (NLTK also counts one n-gram for a sentence too short to
    have any; here a sentence adds the n-grams it has, as in the paper.)
    """
    _check_reference_sets(candidates, references, "bleu")
    if max_n < 1:
        raise ValueError(f"bleu: max_n must be >= 1, got {max_n}")
    matches = [0] * max_n
    totals = [0] * max_n
    cand_len = 0
    ref_len = 0
    for cand, refs in zip(candidates, references):
        cand_tokens = tokenize(cand)
        ref_tokens = [tokenize(r) for r in refs]
        c = len(cand_tokens)
        cand_len += c
        ref_len += min((abs(len(r) - c), len(r)) for r in ref_tokens)[1]
        max_ref_counts: Counter[tuple[str, ...]] = Counter()
        for r in ref_tokens:
            max_ref_counts |= _ngram_counts(r, max_n)  # | keeps the max count per n-gram
        for gram, count in _ngram_counts(cand_tokens, max_n).items():
            matches[len(gram) - 1] += min(count, max_ref_counts[gram])
        for n in range(1, max_n + 1):
            totals[n - 1] += max(0, c - n + 1)

    if cand_len == 0 or matches[0] == 0:
        return 0.0
    log_precision, orders = 0.0, 0
    for m, t in zip(matches, totals):
        if m == 0 and not smooth:
            return 0.0
        if t:  # smoothed: an order with no n-gram at all is left out (effective order)
            log_precision += math.log(m / t if m else _SMOOTH_EPSILON / t)
            orders += 1
    brevity = 1.0 if cand_len > ref_len else math.exp(1.0 - ref_len / cand_len)
    return brevity * math.exp(log_precision / orders)


def sentence_bleu(
    candidate: str, references: Sequence[str], max_n: int = 4, smooth: bool = False
) -> float:
    """BLEU of one candidate against its references: `bleu([candidate], [references])`.
    Sentence-level BLEU is zero whenever some order has no match; prefer `smooth=True` here and
    the corpus-level `bleu` for reporting."""
    if not isinstance(candidate, str):
        raise TypeError(f"sentence_bleu: candidate must be a str, got {type(candidate).__name__}")
    return bleu([candidate], [references], max_n=max_n, smooth=smooth)


# ---------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------


def _cider_tokens(s: str) -> list[str]:
    return [t for t in tokenize(s) if t not in PUNCTUATION]


def cider_d_scores(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-image CIDEr-D scores; `cider_d` is their mean. See `cider_d` for the definition."""
    _check_reference_sets(candidates, references, "cider_d")
    if n < 1:
        raise ValueError(f"cider_d: n must be >= 1, got {n}")
    if not sigma > 0:
        raise ValueError(f"cider_d: sigma must be > 0, got {sigma}")

    cand_counts = [_ngram_counts(_cider_tokens(c), n) for c in candidates]
    ref_counts = [[_ngram_counts(_cider_tokens(r), n) for r in refs] for refs in references]

    # Document frequency: the number of images whose reference set contains the n-gram.
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*refs))
    log_num_images = math.log(len(candidates))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm_sq = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            # An n-gram absent from every reference set gets df = 1, i.e. the largest idf.
            w = tf * (log_num_images - math.log(max(1.0, doc_freq[gram])))
            vec[len(gram) - 1][gram] = w
            norm_sq[len(gram) - 1] += w * w
            if len(gram) == 2:
                # coco-caption measures length as the bigram count (its `n == 1` is the 0-based
                # order); it equals words - 1 for non-empty text, so differences match word counts.
                length += tf
        return vec, [math.sqrt(x) for x in norm_sq], length

    penalty_denom = 2.0 * sigma * sigma
    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        vec_c, norm_c, len_c = tfidf(cand)
        total = 0.0
        for ref in refs:
            vec_r, norm_r, len_r = tfidf(ref)
            penalty = math.exp(-((len_c - len_r) ** 2) / penalty_denom)
            for k in range(n):
                if norm_c[k] == 0.0 or norm_r[k] == 0.0:
                    continue  # an empty (or all-zero-idf) vector has similarity 0
                # Clipping: a candidate n-gram earns at most the reference's weight for it.
                dot = 0.0
                for g, w in vec_c[k].items():
                    w_r = vec_r[k].get(g, 0.0)
                    dot += min(w, w_r) * w_r
                total += penalty * dot / (norm_c[k] * norm_r[k])
        scores.append(10.0 * total / (n * len(refs)))
    return scores


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D (Vedantam, Zitnick & Parikh, "CIDEr: Consensus-based Image Description
    Evaluation", CVPR 2015; the "-D" variant as in coco-caption's cider_scorer.py).

    candidates[i] describes image i, which has the reference captions references[i]. With N
    images, each caption becomes, per order k = 1..n, a vector of TF-IDF weights
    g(w) = tf(w) * (log N - log max(1, df(w))), where df(w) counts the images whose reference
    set contains w (computed over this corpus only). Per image,

        CIDEr-D = 10 / (n * m) * sum_refs sum_k  exp(-(l_c - l_r)^2 / (2 sigma^2))
                  * sum_w min(g_c(w), g_r(w)) g_r(w) / (|g_c| |g_r|)

    for m references, with lengths l measured as coco-caption does (bigram counts) and a term
    taken as 0 when either vector is zero. The corpus score is the mean over images. Note the
    consequences of those exact semantics: the corpus must have several images (with N = 1
    every idf is 0 and so is every score), and a caption shorter than n words cannot reach 10
    because its empty higher-order vectors contribute 0.

    Tokens are those of `tokenize` without punctuation tokens; coco-caption's PTB tokenizer
    splits some words differently (e.g. contractions), so scores may differ slightly on such
    text.
    """
    scores = cider_d_scores(candidates, references, n=n, sigma=sigma)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------


def recall_at_k(
    query_emb: Tensor,
    gallery_emb: Tensor,
    positives: Sequence[set[int]] | Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k for retrieval: the fraction of queries with at least one positive among their
    k most similar gallery items (as in CLIP and the Flickr30k / COCO retrieval benchmarks).

    query_emb: (Q, E); gallery_emb: (G, E), any float dtype; similarity is cosine, computed in
    float64 and rounded to a multiple of 2^-24 (about 6e-8) so that equal cosines compare
    equal. positives: a LongTensor (Q,) with the one correct gallery
    index per query, or a sequence of Q non-empty sets of gallery indices (e.g. the five
    captions of an image). Ties in similarity are broken by gallery index, the lower index
    ranking first, so the result is deterministic. A k larger than G counts every query as a
    hit. Returns {"R@k": recall} for each k in ks, as fractions in [0, 1].
    """
    ks_given = ks
    if query_emb.dim() != 2 or gallery_emb.dim() != 2:
        raise ValueError(
            f"recall_at_k: embeddings must be 2-D (Q, E) and (G, E), got shapes "
            f"{tuple(query_emb.shape)} and {tuple(gallery_emb.shape)}"
        )
    num_q, dim = query_emb.shape
    num_g = gallery_emb.shape[0]
    if gallery_emb.shape[1] != dim:
        raise ValueError(f"recall_at_k: query dim {dim} != gallery dim {gallery_emb.shape[1]}")
    if num_q == 0 or num_g == 0:
        raise ValueError(f"recall_at_k: need queries and a gallery, got Q={num_q}, G={num_g}")
    for name, emb in (("query", query_emb), ("gallery", gallery_emb)):
        if not bool(torch.isfinite(emb).all()):  # NaN similarities would rank as hits
            raise ValueError(f"recall_at_k: the {name} embeddings contain NaN or inf")
    try:
        ks = [operator.index(k) if not isinstance(k, bool) else None for k in ks]
    except TypeError:
        ks = []  # a lone int, or something no index
    if not ks or any(k is None or k < 1 for k in ks):
        raise ValueError(f"recall_at_k: ks must be a non-empty list of positive ints, got {ks_given!r}")
    if isinstance(positives, np.ndarray) and positives.dtype.kind in "iub":  # one index per query, in numpy
        positives = torch.from_numpy(np.array(positives, dtype=positives.dtype.newbyteorder("="), order="C"))
    if len(positives) != num_q:
        raise ValueError(f"recall_at_k: got {len(positives)} positives for {num_q} queries")

    if isinstance(positives, Tensor):
        if positives.dim() != 1 or positives.dtype == torch.bool or positives.is_floating_point():
            raise ValueError(
                f"recall_at_k: positives tensor must be integer with shape (Q,), got "
                f"{positives.dtype} {tuple(positives.shape)}"
            )
        pos_rows = torch.arange(num_q)
        pos_cols = positives.long().cpu()
    else:
        rows, cols = [], []
        for q, pos in enumerate(positives):
            try:  # a lone index (an int, a numpy or 0-d torch integer) is no set, nor are fractions
                values = [] if isinstance(pos, (str, bytes)) else list(pos)
                indices = sorted(int(j) for j in values) if all(int(j) == j for j in values) else []
            except (TypeError, ValueError):
                indices = []
            if not indices:
                raise ValueError(
                    f"recall_at_k: positives[{q}] must be a non-empty set of indices, got {pos!r}"
                )
            rows += [q] * len(indices)
            cols += indices
        pos_rows = torch.tensor(rows, dtype=torch.long)
        pos_cols = torch.tensor(cols, dtype=torch.long)
    if int(pos_cols.min()) < 0 or int(pos_cols.max()) >= num_g:
        raise ValueError(
            f"recall_at_k: positive indices must lie in [0, {num_g}), got {pos_cols.tolist()}"
        )

    # Matmul results can differ in the last bit with the batch shape (BLAS picks different
    # kernels), which would make the tie rule depend on _QUERY_BLOCK. Computing in float64 and
    # rounding to a fixed grid of 2^-24 makes equal cosines compare equal whatever the path.
    q_QE = torch.nn.functional.normalize(query_emb.detach().double(), dim=-1)
    g_GE = torch.nn.functional.normalize(gallery_emb.detach().double(), dim=-1).to(q_QE.device)
    gallery_idx_G = torch.arange(num_g)
    rank_Q = torch.empty(num_q, dtype=torch.long)
    for lo in range(0, num_q, _QUERY_BLOCK):  # blocks bound the (B, G) temporaries
        hi = min(lo + _QUERY_BLOCK, num_q)
        sim_BG = torch.round((q_QE[lo:hi] @ g_GE.T).cpu() * _SIM_GRID) / _SIM_GRID
        start, stop = torch.searchsorted(pos_rows, torch.tensor([lo, hi])).tolist()
        pos_BG = torch.zeros(hi - lo, num_g, dtype=torch.bool)
        pos_BG[pos_rows[start:stop] - lo, pos_cols[start:stop]] = True
        # Rank of the best positive: its similarity s*, at the lowest index j* among positives
        # with s*; ahead of it are items with a higher score, or the same score and a lower index.
        best_B = torch.where(pos_BG, sim_BG, float("-inf")).amax(dim=1, keepdim=True)
        at_best_BG = sim_BG == best_B
        first_B = torch.where(pos_BG & at_best_BG, gallery_idx_G, num_g).amin(dim=1, keepdim=True)
        ahead_BG = (sim_BG > best_B) | (at_best_BG & (gallery_idx_G < first_B))
        rank_Q[lo:hi] = ahead_BG.sum(dim=1)
    return {f"R@{k}": (rank_Q < k).double().mean().item() for k in ks}
