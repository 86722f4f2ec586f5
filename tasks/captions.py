"""captions — an emoji or a Tux Paint stamp -> its caption ("koala", "a horse"). Metrics:
BLEU-4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015) of the generated captions,
and image->text retrieval recall@1/@5 through the contrastive head, all on held-out images.

Data: apt `fonts-noto-color-emoji` rendered with Pillow (names from Unicode), and Tux Paint
stamps (`bash scripts/fetch_tuxpaint.sh`) with the first line of their description; 32x32 RGB.
A seeded 85/15 split of the distinct captions: every image of a caption goes to the same split,
so no caption is in both (many stamps share one, e.g. "a butterfly"); captions that differ only
in a leading article ("a horse", the stamp's, and "horse", the emoji's), in punctuation or in
spacing ("a t shirt", "t-shirt") count as one. Pictures no reader could caption are left out:
a caption that differs from another only by size words when the two pictures are the same once
cropped to fill the frame ("small blue diamond", "large blue diamond"), and the letter stamps I
and l (one bar). The retrieval gallery is the set of distinct test captions (an image's
positives: every gallery entry that is its caption as `caption_key` sees it); those same
entries are its references for BLEU-4 and CIDEr-D, and `exact` counts a generated caption that
is one of them as `caption_key` sees it.
"""

import re

import numpy as np

from generalist.data import sources
from generalist.data.packing import Example
from generalist.data.tasks import Task, normalize, split_indices, take
from generalist.metrics import bleu, cider_d, recall_at_k


def caption_key(caption: str) -> str:
    """What makes two captions one: the caption's letters and digits, without its leading
    article ("a t shirt" and "t-shirt", "“hospital”" and "hospital" are one)."""
    return re.sub(r"[\W_]+", "", re.sub(r"^(a|an|the) ", "", caption))


# Captions no picture tells apart: Tux Paint draws the capital I and the small l as one bar.
SAME_GLYPH = ("the letter i", "the letter l")
# ... nor the American Sign Language letters and numbers that are one handshape (O and 0, V and 2,
# W and 6, F and 9)
SAME_GLYPH += tuple(f"the sign for the {x} in american sign language" for pair in
                    (("letter o", "number 0"), ("letter v", "number 2"), ("letter w", "number 6"), ("letter f", "number 9"))
                    for x in pair)
SIZE_WORDS = re.compile(r"\b(small|medium|large)\b")
NEAR_SAME = 6.0  # mean absolute pixel difference (of 255) under which two pictures are one


def distinct_pictures(images: np.ndarray, captions: list[str]) -> list[int]:
    """Indices of the images to keep: every one but the SAME_GLYPH captions' and those whose
    caption differs from an earlier kept one's only by size words while the pictures are the
    same (NEAR_SAME): every picture is cropped to fill the frame, so "white medium square" and
    "white large square", "small blue diamond" and "large blue diamond" are one picture."""
    keep, seen = [], {}  # seen: caption without size words -> indices kept
    for i, caption in enumerate(captions):
        if caption in SAME_GLYPH:
            continue
        sizeless = caption_key(SIZE_WORDS.sub(" ", caption))
        earlier = [j for j in seen.get(sizeless, ()) if caption_key(captions[j]) != caption_key(caption)]
        if any(np.abs(images[i].astype(np.int16) - images[j]).mean() <= NEAR_SAME for j in earlier):
            continue
        keep.append(i)
        seen.setdefault(sizeless, []).append(i)
    return keep


def caption_split(captions, split: str, seed: int) -> np.ndarray:
    """Indices of `split` (85/15): the distinct captions (`caption_key`, in first-seen order) are
    split with split_indices, each image follows its caption, and the split's images come in a
    seeded order."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        groups.setdefault(caption_key(c), []).append(i)
    members = list(groups.values())
    chosen = split_indices(len(members), split, 0.15, seed)
    idx = np.array(sorted(i for g in chosen for i in members[g]), dtype=np.int64)
    return idx[np.random.default_rng([seed, len(captions), 2_000_003]).permutation(len(idx))]


class Captions(Task):
    name = "captions"
    contrastive = True

    def _all(self):
        images, names = sources.emoji(32)
        t_images, t_captions, _ = sources.tuxpaint(32)
        images, captions = np.concatenate([images, t_images]), [normalize(c) for c in list(names) + list(t_captions)]
        keep = distinct_pictures(images, captions)
        return images[keep], [captions[i] for i in keep]

    def examples(self, split, limit=None, seed=0):
        images, captions = self._all()
        idx = take(caption_split(captions, split, seed), limit)
        return [Example([("image", images[i])], captions[i], self.name) for i in idx]

    def matches(self, answer, example):
        return caption_key(normalize(answer)) == caption_key(example.target_text)

    def evaluate(self, predictor, examples):
        refs = [e.target_text for e in examples]
        preds = predictor.generate(examples)
        gallery = sorted(set(refs))
        texts = predictor.embed([Example([("text", c)], "", self.name) for c in gallery])
        images = predictor.embed(examples)
        keys = [caption_key(c) for c in gallery]
        positives = [{j for j, k in enumerate(keys) if k == caption_key(r)} for r in refs]
        recall = recall_at_k(images, texts, positives, ks=(1, 5))
        # an image's references: its caption, then the other test captions that are the same
        # caption ("a horse" for the emoji captioned "horse")
        references = [[r] + sorted(gallery[j] for j in positives[i] if gallery[j] != r) for i, r in enumerate(refs)]
        return {"bleu4": bleu(preds, references, smooth=True), "cider_d": cider_d(preds, references),
                "exact": sum(self.matches(p, e) for p, e in zip(preds, examples)) / len(refs),
                **{k.lower().replace("@", "_at_"): v for k, v in recall.items()}}


TASK = Captions()
