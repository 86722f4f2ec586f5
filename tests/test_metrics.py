"""Tests for generalist.metrics against values worked out by hand in the comments."""

import math

import numpy as np
import pytest
import torch

from generalist.metrics import (
    accuracy,
    accuracy_by,
    bleu,
    cider_d,
    cider_d_scores,
    macro_f1,
    normalize_text,
    recall_at_k,
    sentence_bleu,
    tokenize,
)

# ---------------------------------------------------------------------------------------------
# Text normalization
# ---------------------------------------------------------------------------------------------


def test_normalize_text():
    assert normalize_text("  Hello   World.  ") == "hello world"
    assert normalize_text("yes .") == "yes"
    assert normalize_text("3.5") == "3.5"  # only a trailing period goes
    assert normalize_text("Wait...") == "wait.."  # and only one of them
    assert normalize_text("") == ""


def test_tokenize_splits_punctuation():
    assert tokenize("Hi, (you) don't!") == ["hi", ",", "(", "you", ")", "don", "'", "t", "!"]
    assert tokenize('Say "no"; ok?') == ["say", '"', "no", '"', ";", "ok", "?"]
    assert tokenize("A dog.") == ["a", "dog"]
    assert tokenize("   ") == []


def test_normalize_rejects_non_str():
    with pytest.raises(TypeError):
        normalize_text(3)


# ---------------------------------------------------------------------------------------------
# Accuracy and macro F1
# ---------------------------------------------------------------------------------------------

PREDS = ["Yes.", "two ", "A  Dog", "cat"]
REFS = ["yes", "2", "a dog", "cats"]  # matches after normalization: 1st and 3rd -> 2 / 4


def test_accuracy():
    assert accuracy(PREDS, REFS) == 0.5
    assert accuracy(["a"], ["a"]) == 1.0
    assert accuracy(["a"], ["b"]) == 0.0


def test_accuracy_by_group():
    groups = ["yes/no", "number", "other", "other"]
    out = accuracy_by(PREDS, REFS, groups)
    assert out == {"yes/no": 1.0, "number": 0.0, "other": 0.5}
    assert list(out) == ["yes/no", "number", "other"]  # order of first appearance


def test_macro_f1():
    # a: TP 1, FP 1 (pred a / ref b), FN 0 -> F1 = 2/(2+1) = 2/3
    # b: TP 1, FP 0, FN 2 (ref b predicted a and c) -> F1 = 2/(2+2) = 1/2
    # c: TP 0, FP 1, FN 0 -> F1 = 0
    # macro = (2/3 + 1/2 + 0) / 3 = 7/18
    got = macro_f1(["a", "a", "b", "C."], ["a", "b", "b", "b"])
    assert got == pytest.approx(7 / 18, abs=1e-12)
    assert macro_f1(["x", "y"], ["x", "y"]) == 1.0


@pytest.mark.parametrize("fn", [accuracy, macro_f1])
def test_classification_errors(fn):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        fn([], [])
    with pytest.raises(ValueError, match="not a single str"):
        fn("ab", "ab")


def test_accuracy_by_errors():
    with pytest.raises(ValueError, match="1 groups for 2 predictions"):
        accuracy_by(["a", "b"], ["a", "b"], ["g"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        accuracy_by(["a", "b"], ["a"], ["g", "g"])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy_by([], [], [])


# ---------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------

# Papineni et al. 2002, section 2.1, Example 1. After tokenize (lower-case, trailing period
# dropped) the candidates have 18 and 14 tokens and the references 16, 18 and 16.
PAP_C1 = (
    "It is a guide to action which ensures that the military always obeys the commands of the "
    "party."
)
PAP_C2 = "It is to insure the troops forever hearing the activity guidebook that party direct."
PAP_REFS = [
    "It is a guide to action that ensures that the military will forever heed Party commands.",
    "It is the guiding principle which guarantees the military forces always being under the "
    "command of the Party.",
    "It is the practical guide for the army always to heed the directions of the party.",
]


def test_bleu_identical_is_one():
    assert bleu(["The cat sat on the mat."], [["the cat sat on the mat"]]) == 1.0
    assert sentence_bleu("a b c d e", ["x y", "a b c d e"]) == 1.0


def test_bleu_papineni_candidate_1():
    # c = 18; the closest reference length is 18 (reference 2), so BP = 1.
    # Unigrams: every word but "obeys" appears in some reference; "the" occurs 3 times and up
    # to 4 times in reference 2 -> p1 = 17/18 (the paper's value).
    assert sentence_bleu(PAP_C1, PAP_REFS, max_n=1) == pytest.approx(17 / 18, abs=1e-12)
    # Bigrams (17): matched are "it is", "is a", "a guide", "guide to", "to action",
    # "ensures that", "that the", "the military" (ref 1), "of the", "the party" (refs 2, 3)
    # -> p2 = 10/17 (the paper's value). BLEU-2 = (17/18 * 10/17)^(1/2) = (10/18)^(1/2).
    assert sentence_bleu(PAP_C1, PAP_REFS, max_n=2) ** 2 == pytest.approx(10 / 18, abs=1e-12)
    # Trigrams (16): "it is a", "is a guide", "a guide to", "guide to action",
    # "ensures that the", "that the military", "of the party" -> p3 = 7/16.
    # 4-grams (15): "it is a guide", "is a guide to", "a guide to action",
    # "ensures that the military" -> p4 = 4/15.
    # BLEU-4 = (17/18 * 10/17 * 7/16 * 4/15)^(1/4) = (7/108)^(1/4) = 0.504566684...
    # (the value NLTK documents for the same sentence).
    # (7/108)^(1/4) = 0.504566684..., the value NLTK documents for the same sentence.
    assert sentence_bleu(PAP_C1, PAP_REFS) == pytest.approx((7 / 108) ** 0.25, abs=1e-12)


def test_bleu_papineni_candidate_2_and_corpus():
    # C2: 14 tokens, closest reference length 16 -> BP = exp(1 - 16/14) = exp(-1/7).
    # Unigrams matched: it, is, to, the, the, forever, that, party -> p1 = 8/14 (paper).
    bp = math.exp(-1 / 7)
    assert sentence_bleu(PAP_C2, PAP_REFS, max_n=1) == pytest.approx(bp * 8 / 14, abs=1e-12)
    # Bigrams: only "it is" of 13 -> p2 = 1/13 (paper).
    got = (sentence_bleu(PAP_C2, PAP_REFS, max_n=2) / bp) ** 2
    assert got == pytest.approx(8 / 14 / 13, abs=1e-12)
    # No trigram matches: sentence BLEU-4 is 0.
    assert sentence_bleu(PAP_C2, PAP_REFS) == 0.0
    # Corpus of both: counts are summed before dividing.
    #   p1 = (17 + 8) / (18 + 14) = 25/32, p2 = (10 + 1) / (17 + 13) = 11/30,
    #   p3 = (7 + 0) / (16 + 12) = 7/28,   p4 = (4 + 0) / (15 + 11) = 4/26,
    #   c = 32, r = 18 + 16 = 34 -> BP = exp(1 - 34/32) = exp(-1/16).
    expected = math.exp(-1 / 16) * (25 / 32 * 11 / 30 * 7 / 28 * 4 / 26) ** 0.25  # 0.30435...
    got = bleu([PAP_C1, PAP_C2], [PAP_REFS, PAP_REFS])
    assert got == pytest.approx(expected, abs=1e-12)
    # ...which is not the mean of sentence scores ((0.5046 + 0) / 2 = 0.2523).
    assert abs(got - (sentence_bleu(PAP_C1, PAP_REFS) + 0.0) / 2) > 0.05


def test_bleu_clipping():
    # Papineni's clipping example: "the" x 7; "the" occurs at most twice in one reference.
    # c = 7, reference lengths 6 and 7 -> r = 7, BP = 1; p1 = 2/7.
    refs = ["The cat is on the mat.", "There is a cat on the mat."]
    got = sentence_bleu("the the the the the the the", refs, max_n=1)
    assert got == pytest.approx(2 / 7, abs=1e-12)


def test_bleu_brevity_penalty():
    # All four n-gram precisions are 1 (1 of 1 4-gram), c = 4, r = 8 -> exp(1 - 8/4) = exp(-1).
    got = sentence_bleu("the quick brown fox", ["the quick brown fox jumps over the dog"])
    assert got == pytest.approx(math.exp(-1), abs=1e-12)


def test_bleu_closest_length_tie_goes_to_shorter():
    # c = 5; references of length 4 and 6 are equally close. The shorter one (4) is used, so
    # c > r and BP = 1; all precisions are 1 (every n-gram is in the 6-token reference).
    # Had the longer one been used, BP would be exp(1 - 6/5) = 0.8187.
    cand = "one two three four five"
    assert sentence_bleu(cand, ["one two three four", "one two three four five six"]) == 1.0
    assert sentence_bleu(cand, ["one two three four five six", "one two three four"]) == 1.0
    # With only the longer reference the penalty applies.
    got = sentence_bleu(cand, ["one two three four five six"])
    assert got == pytest.approx(math.exp(-0.2), abs=1e-12)


def test_bleu_smoothing_method_1():
    cand, ref = "the cat sat on a mat", "the cat sat near a mat"
    # p1 = 5/6 (all but "on"), p2 = 3/5 ("the cat", "cat sat", "a mat"), p3 = 1/4
    # ("the cat sat"), p4 = 0/3; c = r = 6 so BP = 1.
    assert sentence_bleu(cand, [ref]) == 0.0
    # Method 1: p4 = 0.1 / 3 -> BLEU = (5/6 * 3/5 * 1/4 * 0.1/3)^(1/4) = (1/240)^(1/4).
    assert sentence_bleu(cand, [ref], smooth=True) == pytest.approx((1 / 240) ** 0.25, abs=1e-12)
    # Orders with matches are untouched by smoothing.
    assert sentence_bleu(cand, [ref], max_n=3, smooth=True) == sentence_bleu(cand, [ref], max_n=3)


def test_bleu_smoothing_leaves_out_orders_no_candidate_has():
    # Captions shorter than 4 words that equal their references: trigrams and 4-grams exist in
    # no candidate, so they are left out (sacrebleu's effective order) and the score is 1.
    assert bleu(["koala", "a horse"], [["koala"], ["a horse"]], smooth=True) == 1.0
    # p1 = 4/5 (all but "c"), p2 = 2/3 ("a b" and "x y" of "a b", "b c", "x y"), p3 = 0.1/1
    # (the one trigram "a b c" unmatched), no 4-gram anywhere; c = r = 5, so BP = 1.
    got = bleu(["a b c", "x y"], [["a b d"], ["x y"]], smooth=True)
    assert got == pytest.approx((4 / 5 * 2 / 3 * 0.1) ** (1 / 3), abs=1e-12)
    # Without smoothing an order with no n-gram is no match: 0, as in the paper.
    assert bleu(["koala", "a horse"], [["koala"], ["a horse"]]) == 0.0


def test_bleu_smoothing_without_any_word_in_common_is_zero():
    assert bleu(["dog"], [["cat"]], smooth=True) == 0.0
    assert bleu(["a dog ran far away"], [["the cat sat on mats"]], smooth=True) == 0.0


def test_bleu_empty_candidate_scores_zero():
    assert bleu([""], [["a b"]]) == 0.0
    assert bleu([""], [["a b"]], smooth=True) == 0.0


def test_bleu_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no predictions"):
        bleu([], [])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        bleu(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="is a str"):
        bleu(["a"], ["a"])
    with pytest.raises(ValueError, match="max_n"):
        bleu(["a"], [["a"]], max_n=0)
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        sentence_bleu("a", [])


# ---------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------


def test_cider_d_identical_disjoint_two_images():
    # N = 2 images, disjoint vocabularies: every reference n-gram has df = 1, so
    # idf = log 2 - log 1 = log 2 everywhere. A candidate equal to its single reference has
    # cosine 1 in every order it has n-grams, and delta = 0 (no length penalty).
    # 4 words: orders 1..4 all have n-grams -> 10 * (1 + 1 + 1 + 1) / 4 = 10.
    refs = [["red car on road"], ["blue sky with clouds"]]
    got = cider_d_scores(["red car on road", "blue sky with clouds"], refs)
    assert got == pytest.approx([10.0, 10.0], abs=1e-12)
    # 2 words: orders 3 and 4 are empty vectors and contribute 0 -> 10 * (1 + 1) / 4 = 5.
    two_word_refs = [["red car"], ["blue sky"]]
    assert cider_d(["red car", "blue sky"], two_word_refs) == pytest.approx(5.0, abs=1e-12)
    # Punctuation tokens are dropped, so these score the same.
    assert cider_d(["Red, car.", "blue sky!"], two_word_refs) == pytest.approx(5.0, abs=1e-12)


def test_cider_d_hand_computed_three_images():
    cands = ["a dog runs", "a cat sleeps", "the bird sings"]
    refs = [["a dog runs", "a dog sleeps"], ["a cat sleeps"], ["the bird sings"]]
    # N = 3, ref_len = log 3. Document frequencies over the reference sets:
    #   "a" (images 1, 2) and "sleeps" (images 1, 2): df = 2 -> idf M = log 3 - log 2 = log 1.5
    #   every other n-gram: df = 1 -> idf L = log 3 - log 1 = log 3
    L, M = math.log(3), math.log(1.5)
    # Image 1, candidate "a dog runs" (bigram length 2):
    #   order 1: {a: M, dog: L, runs: L}, |.| = sqrt(M^2 + 2 L^2)
    #   order 2: {a dog: L, dog runs: L}, |.| = sqrt(2) L;   order 3: {a dog runs: L};  order 4: {}
    # vs ref 1 "a dog runs" (identical): cosines 1, 1, 1, 0 (order 4 empty).
    # vs ref 2 "a dog sleeps": order 1 {a: M, dog: L, sleeps: M}, |.| = sqrt(2 M^2 + L^2);
    #   dot = min(M, M) M + min(L, L) L + min(L, 0) 0 = M^2 + L^2
    #   order 2: {a dog: L, dog sleeps: L}: dot = L^2, cosine = L^2 / (2 L^2) = 1/2
    #   order 3: no shared trigram -> 0; order 4 -> 0. Both lengths 2 -> no penalty.
    # score = 10 / (4 orders * 2 refs)
    #         * (3 + (M^2 + L^2) / sqrt((M^2 + 2 L^2)(2 M^2 + L^2)) + 1/2)
    cos1 = (M**2 + L**2) / math.sqrt((M**2 + 2 * L**2) * (2 * M**2 + L**2))
    image1 = 10 / 8 * (3.5 + cos1)  # = 5.236452...
    # Images 2 and 3: identical to their single 3-word reference -> 10 * 3/4 = 7.5 each.
    scores = cider_d_scores(cands, refs)
    assert scores == pytest.approx([image1, 7.5, 7.5], abs=1e-6)
    assert image1 == pytest.approx(5.236452, abs=1e-6)
    assert cider_d(cands, refs) == pytest.approx((image1 + 15) / 3, abs=1e-6)


def test_cider_d_clips_candidate_weights():
    # N = 2, idf = log 2 =: L for every n-gram (reference n-grams have df = 1, the unseen
    # bigram "red red" has df = 0 -> max(1, 0) = 1). Candidate "red red" vs reference "red car":
    #   order 1: cand {red: 2L} (|.| = 2L), ref {red: L, car: L} (|.| = sqrt(2) L)
    #            clipped dot = min(2L, L) L = L^2 -> cosine 1 / (2 sqrt 2)
    #            (unclipped it would be 2L^2 / (2 sqrt(2) L^2) = 1/sqrt 2)
    #   order 2: no shared bigram -> 0; orders 3, 4 empty -> 0. Bigram lengths 1 and 1.
    # score = 10 * (1 / (2 sqrt 2)) / 4 = 0.883883...
    scores = cider_d_scores(["red red", "blue sky"], [["red car"], ["blue sky"]])
    assert scores[0] == pytest.approx(10 / (8 * math.sqrt(2)), abs=1e-6)


def test_cider_d_single_image_is_zero():
    # With N = 1, every reference n-gram has idf log 1 - log 1 = 0, so every term vanishes.
    assert cider_d(["a dog runs fast"], [["a dog runs fast"]]) == 0.0


CORPUS_CANDS = [
    "a man riding a wave on a surfboard",
    "two dogs play in the snow",
    "a plate of food with broccoli",
    "a red bus on a city street",
    "a cat sitting on a laptop",
]
CORPUS_REFS = [
    ["a man rides a wave on top of a surfboard", "a surfer riding a large wave"],
    ["two dogs playing in the snow", "dogs run through deep snow", "a pair of dogs in snow"],
    ["a plate with broccoli and rice", "food on a white plate"],
    ["a red double decker bus on a street", "a bus driving down a city street"],
    ["a cat lying on a laptop keyboard", "a cat sits on an open laptop"],
]


def test_cider_d_permutation_invariant(gen):
    perm = torch.randperm(len(CORPUS_CANDS), generator=gen).tolist()
    base = cider_d_scores(CORPUS_CANDS, CORPUS_REFS)
    permuted = cider_d_scores([CORPUS_CANDS[i] for i in perm], [CORPUS_REFS[i] for i in perm])
    assert permuted == pytest.approx([base[i] for i in perm], abs=1e-12)
    # Reference order within an image does not matter either.
    reversed_refs = [list(reversed(r)) for r in CORPUS_REFS]
    assert cider_d_scores(CORPUS_CANDS, reversed_refs) == pytest.approx(base, abs=1e-12)
    assert cider_d(CORPUS_CANDS, CORPUS_REFS) == pytest.approx(sum(base) / len(base), abs=1e-12)


def test_cider_d_exact_beats_partial():
    exact = cider_d_scores([r[0] for r in CORPUS_REFS], CORPUS_REFS)
    partial_cands = ["a man on a wave"] + [r[0] for r in CORPUS_REFS[1:]]
    partial = cider_d_scores(partial_cands, CORPUS_REFS)
    assert exact[0] > partial[0] > 0
    assert exact[1:] == partial[1:]  # same candidates and the same reference corpus


def test_cider_d_length_penalty():
    # Single reference per image, so every per-order similarity of one image is multiplied by
    # the same Gaussian factor: score(sigma) / score(no penalty) = exp(-delta^2 / (2 sigma^2)).
    refs = [["a dog runs in the park"], ["blue sky with clouds"]]
    longer = ["a dog runs in the park today", "blue sky with clouds"]  # delta = 1 bigram
    penalized = cider_d_scores(longer, refs)[0]
    unpenalized = cider_d_scores(longer, refs, sigma=1e9)[0]
    assert penalized == pytest.approx(unpenalized * math.exp(-1 / 72), rel=1e-12)
    assert penalized < unpenalized
    # The extra word also lowers the score against the identical candidate (which is 10).
    assert penalized < cider_d_scores(["a dog runs in the park", "blue sky with clouds"], refs)[0]
    # delta = 10 - 5 = 5 bigrams
    much_longer = ["a dog runs in the park today with a red ball", "blue sky with clouds"]
    r = cider_d_scores(much_longer, refs)[0] / cider_d_scores(much_longer, refs, sigma=1e9)[0]
    assert r == pytest.approx(math.exp(-25 / 72), rel=1e-12)


def test_cider_d_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        cider_d(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no predictions"):
        cider_d([], [])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        cider_d(["a", "b"], [[], ["b"]])
    with pytest.raises(ValueError, match="is a str"):
        cider_d(["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="n must be"):
        cider_d(["a", "b"], [["a"], ["b"]], n=0)
    with pytest.raises(ValueError, match="sigma"):
        cider_d(["a", "b"], [["a"], ["b"]], sigma=0.0)


# ---------------------------------------------------------------------------------------------
# Recall@k
# ---------------------------------------------------------------------------------------------

# Gallery: the four axis directions. Cosine orderings (highest first):
#   q0 = [2, 1]:  g0 (2/sqrt5), g1 (1/sqrt5), g3 (-1/sqrt5), g2 (-2/sqrt5)
#   q1 = [-1, 3]: g1 (3/sqrt10), g2 (1/sqrt10), g0 (-1/sqrt10), g3 (-3/sqrt10)
#   q2 = [0, -5]: g3 (1), then g0 and g2 tie at 0 (g0 first, lower index), g1 (-1)
#   q3 = [3, 0]:  g0 (1), then g1 and g3 tie at 0, g2 (-1)
GALLERY = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
QUERIES = torch.tensor([[2.0, 1.0], [-1.0, 3.0], [0.0, -5.0], [3.0, 0.0]])


def test_recall_at_k_single_positive():
    # Positives 1, 0, 2, 0 rank 1, 2, 2 (behind g3 and, by the tie rule, g0), 0.
    # R@1 = 1/4, R@2 = 2/4, R@3 = R@4 = R@10 = 4/4.
    out = recall_at_k(QUERIES, GALLERY, torch.tensor([1, 0, 2, 0]), ks=(1, 2, 3, 4, 10))
    assert out == {"R@1": 0.25, "R@2": 0.5, "R@3": 1.0, "R@4": 1.0, "R@10": 1.0}


def test_recall_at_k_refuses_non_finite_embeddings():
    # NaN similarities once ranked every positive first: a diverged model scored R@1 = 1
    for queries, gallery, which in [(QUERIES * float("nan"), GALLERY, "query"), (QUERIES, GALLERY / 0.0, "gallery")]:
        with pytest.raises(ValueError, match=f"the {which} embeddings contain NaN or inf"):
            recall_at_k(queries, gallery, torch.tensor([1, 0, 2, 0]), ks=(1,))


def test_recall_at_k_positive_sets():
    # Best-ranked positive counts: q0 {2, 1} -> rank 1 (g1); q1 {3} -> rank 3;
    # q2 {0, 1} -> rank 1 (g0 wins the tie); q3 {3, 1} -> rank 1 (g1 wins the tie with g3).
    out = recall_at_k(QUERIES, GALLERY, [{2, 1}, {3}, {0, 1}, {3, 1}], ks=(1, 2, 3, 4))
    assert out == {"R@1": 0.0, "R@2": 0.75, "R@3": 0.75, "R@4": 1.0}
    # The default ks.
    out = recall_at_k(QUERIES, GALLERY, [{0}, {1}, {3}, {0}])
    assert out == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}


def test_recall_at_k_many_queries():
    # 4 * 301 = 1204 queries span more than one block of queries; each copy of the four
    # queries ranks its positive as in test_recall_at_k_single_positive.
    queries = QUERIES.repeat(301, 1)
    positives = torch.tensor([1, 0, 2, 0]).repeat(301)
    out = recall_at_k(queries, GALLERY, positives, ks=(1, 2, 3))
    assert out == {"R@1": 0.25, "R@2": 0.5, "R@3": 1.0}


def test_recall_at_k_ties_lower_index_wins():
    # g0 and g1 are the same direction (cosine exactly 1 for both); g2 is orthogonal.
    gallery = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 0.0]])
    assert recall_at_k(query, gallery, torch.tensor([0]), ks=(1,)) == {"R@1": 1.0}
    assert recall_at_k(query, gallery, torch.tensor([1]), ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0}
    assert recall_at_k(query, gallery, [{1, 0}], ks=(1,)) == {"R@1": 1.0}
    # Reordering the gallery moves the tie winner with it.
    swapped = gallery[[1, 0, 2]]
    assert recall_at_k(query, swapped, torch.tensor([0]), ks=(1,)) == {"R@1": 1.0}


def test_recall_at_k_rounding_keeps_exact_ties():
    # Every gallery row is orthogonal to the query, so all cosines are exactly 0; computed
    # in floating point some come out as +-1e-17. The ranking must still follow the index.
    # (Each row sums to 0, so it is orthogonal to [1, 1, 1].)
    query = torch.tensor([[1.0, 1.0, 1.0]])
    gallery = torch.tensor(
        [[6.0, -7.0, 1.0], [7.0, -6.0, -1.0], [5.0, -7.0, 2.0], [7.0, -5.0, -2.0]]
    )
    for j in range(4):
        out = recall_at_k(query, gallery, torch.tensor([j]), ks=(1, 2, 3, 4))
        assert out == {f"R@{k}": float(j < k) for k in (1, 2, 3, 4)}


def test_recall_at_k_scale_invariant_and_dtypes():
    idx = torch.tensor([1, 0, 2, 0])
    base = recall_at_k(QUERIES, GALLERY, idx, ks=(1, 2, 3))
    assert recall_at_k(QUERIES * 7.0, GALLERY * 0.5, idx, ks=(1, 2, 3)) == base
    assert recall_at_k(QUERIES.double(), GALLERY.double(), idx, ks=(1, 2, 3)) == base
    assert recall_at_k(QUERIES.bfloat16(), GALLERY.bfloat16(), idx, ks=(1, 2, 3)) == base


def test_recall_at_k_takes_positives_in_numpy_and_sets_of_any_integers():
    base = recall_at_k(QUERIES, GALLERY, torch.tensor([1, 0, 2, 0]), ks=(1, 2, 3))
    assert recall_at_k(QUERIES, GALLERY, np.array([1, 0, 2, 0]), ks=(1, 2, 3)) == base
    assert recall_at_k(QUERIES, GALLERY, np.array([1, 0, 2, 0], dtype=np.uint8), ks=(1, 2, 3)) == base
    assert recall_at_k(QUERIES, GALLERY, np.array([0, 2, 0, 1])[::-1], ks=(1, 2, 3)) == base  # a reversed view
    assert recall_at_k(QUERIES, GALLERY, np.array([1, 0, 2, 0], dtype=">i8"), ks=(1, 2, 3)) == base  # big-endian
    sets = [{np.int64(1)}, [torch.tensor(0)], (2,), torch.tensor([0])]
    assert recall_at_k(QUERIES, GALLERY, sets, ks=(1, 2, 3)) == base


def test_recall_at_k_errors():
    idx = torch.tensor([0, 0, 0, 0])
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(QUERIES[0], GALLERY, idx)
    with pytest.raises(ValueError, match="query dim 2 != gallery dim 3"):
        recall_at_k(QUERIES, torch.zeros(4, 3), idx)
    with pytest.raises(ValueError, match="Q=0"):
        recall_at_k(QUERIES[:0], GALLERY, idx[:0])
    with pytest.raises(ValueError, match="G=0"):
        recall_at_k(QUERIES, GALLERY[:0], idx)
    with pytest.raises(ValueError, match="3 positives for 4 queries"):
        recall_at_k(QUERIES, GALLERY, idx[:3])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        recall_at_k(QUERIES, GALLERY, torch.tensor([0, 4, 0, 0]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        recall_at_k(QUERIES, GALLERY, [{0}, {-1}, {0}, {0}])
    with pytest.raises(ValueError, match=r"positives\[1\] must be a non-empty set"):
        recall_at_k(QUERIES, GALLERY, [{0}, set(), {0}, {0}])
    for lone in (torch.tensor(2), np.int64(2), 2, "2", {1.9}):  # an index where a set belongs: named, not a TypeError
        with pytest.raises(ValueError, match=r"positives\[1\] must be a non-empty set of indices, got"):
            recall_at_k(QUERIES, GALLERY, [{0}, lone, {0}, {0}])
    with pytest.raises(ValueError, match="integer with shape"):
        recall_at_k(QUERIES, GALLERY, idx.float())
    with pytest.raises(ValueError, match="ks must be"):
        recall_at_k(QUERIES, GALLERY, idx, ks=(0,))
    with pytest.raises(ValueError, match="ks must be"):
        recall_at_k(QUERIES, GALLERY, idx, ks=())
    for ks in (1, (True,), (2.5,), ("5",)):  # a lone int, a bool, no integer
        with pytest.raises(ValueError, match="ks must be a non-empty list of positive ints"):
            recall_at_k(QUERIES, GALLERY, idx, ks=ks)
    assert recall_at_k(QUERIES, GALLERY, idx, ks=(np.int64(1),)).keys() == {"R@1"}


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "bleu", "cider_d"])
def test_a_prediction_that_is_no_str_is_named(metric):
    from generalist import metrics

    fn = getattr(metrics, metric)
    refs = [["a cat"], ["a dog"]] if metric in ("bleu", "cider_d") else ["a cat", "a dog"]
    with pytest.raises(ValueError, match=rf"{metric}: predictions\[1\] is float nan, expected a str"):
        fn(["a cat", float("nan")], refs)
    bad_refs = [["a cat"], ["a dog", 7]] if metric in ("bleu", "cider_d") else ["a cat", 7]
    name = r"references\[1\]\[1\]" if metric in ("bleu", "cider_d") else r"references\[1\]"
    with pytest.raises(ValueError, match=rf"{metric}: {name} is int 7, expected a str"):
        fn(["a cat", "a dog"], bad_refs)


def test_task_scores_normalize_as_the_metrics_do():
    """A task's overall accuracy and its per-type accuracies compare texts the same way (a
    prediction ending in two periods is wrong in both, not right in one)."""
    from generalist.data.packing import Example
    from generalist.data.tasks import get_task, normalize

    assert all(normalize(s) == normalize_text(s) for s in ("Yes..", "  A  Dog. ", "3.5", "wait..."))
    examples = [Example([("text", "q")], "yes", "vqa", {"qtype": t}) for t in ("exists", "exists", "count")]
    scores = get_task("vqa").score(["yes..", "Yes.", "no"], examples)
    assert scores["accuracy"] == pytest.approx(1 / 3)
    assert scores["accuracy_exists"] == 0.5 and scores["accuracy_count"] == 0.0
