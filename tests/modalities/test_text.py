"""TextTokenizer (training, round trips, special tokens, serialization), TextEmbed, and the
modality registry."""

import re

import numpy as np
import pytest
import torch

from generalist.modalities import (
    MODALITIES, SPECIAL_TOKENS, AudioConfig, ImageConfig, TextConfig, TextEmbed, TextTokenizer,
    build_embedders,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture of a cat sitting on a red sofa near the window.",
    "The weather in the mountains changes quickly in the spring.",
    "She poured the coffee and opened the morning newspaper.",
    "Two children are playing football in the park after school.",
    "The train to the city leaves at seven fifteen every morning.",
    "He read the report twice before sending it to the committee.",
    "Fresh bread from the bakery smells wonderful in the morning.",
    "The museum opens a new exhibition about ancient maps next week.",
    "Rain is expected tomorrow, so bring an umbrella to the station.",
    "The orchestra played the symphony with remarkable precision.",
    "A small boat drifted slowly across the calm blue lake.",
    "The recipe calls for two eggs, a cup of flour and some butter.",
    "Our team finished the project three days ahead of schedule.",
    "The old lighthouse stands alone at the edge of the cliff.",
    "Students gathered in the library to prepare for the final exam.",
    "The market sells fruit, vegetables, cheese and fresh fish.",
    "A dog is running along the beach chasing a yellow ball.",
    "The patient recovered well after the operation last month.",
    "Prices rose by three percent in the second quarter of the year.",
    "The garden is full of roses, tulips and tall sunflowers.",
    "He forgot his keys at the office and had to go back.",
    "The spacecraft entered orbit around the planet on Tuesday.",
    "The children laughed at the clown in the bright green hat.",
    "Please send the invoice to the accounting department by Friday.",
    "The river flows through the valley towards the distant sea.",
    "Le café est fermé le dimanche, mais la boulangerie est ouverte.",
    "Der Zug nach München fährt um acht Uhr ab.",
    "東京の天気は明日晴れるでしょう。",
    "A naïve reader might miss the irony in the last chapter.",
]
EXTRA = ("<task:caption>", "<task:classify>")


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(CORPUS, vocab_size=600, extra_special_tokens=EXTRA)


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — 東京",
    "  leading spaces, trailing tabs\t\n and CRLF\r\n",
    "emoji 😀👍🏽 and symbols ∑ ≤ ≠ €",
    "literal <image> and <bos> are plain text here",
    "",
    "zzqx never seen in training!!!",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.int64)) == text


def test_merges_are_learned(tok):
    assert 256 + len(SPECIAL_TOKENS) + len(EXTRA) < tok.vocab_size <= 600
    text = "the morning train to the station"
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_special_tokens_are_single_ids(tok):
    names = SPECIAL_TOKENS + EXTRA
    assert tok.special_tokens == names
    ids = [tok.token_id(n) for n in names]
    assert ids == list(range(len(names)))  # special tokens come first, in declaration order
    for name, i in zip(names, ids):
        assert tok.decode([i], skip_special_tokens=False) == name
        assert tok.decode([i]) == ""
        assert i not in tok.encode(name)  # typed text never becomes a special token
    body = tok.encode("a cat")
    seq = [tok.token_id("<bos>"), tok.token_id("<task:caption>")] + body + [tok.token_id("<eos>")]
    assert tok.decode(seq) == "a cat"
    assert tok.decode(seq, skip_special_tokens=False) == "<bos><task:caption>a cat<eos>"


def test_special_tokens_never_share_an_id_with_text_and_decode_as_named():
    """An extra special token the pre-tokenizer keeps whole ("|", "<->") could be a byte symbol or
    a learned merge, and typed text would encode to it (and decode drop it): refused. One named
    with Latin-1 letters decodes as named, not byte by byte."""
    corpus = ["a | b <-> c ## d"] * 50
    for bad in ("|", "<->", "##"):
        with pytest.raises(ValueError, match=f"special token '{re.escape(bad)}' could share an id with typed text"):
            TextTokenizer.train(corpus, 400, extra_special_tokens=[bad])
    tok = TextTokenizer.train(corpus, 400, extra_special_tokens=["<task:légende>", "‹é>"])
    for name in tok.special_tokens:
        assert tok.decode([tok.token_id(name)], skip_special_tokens=False) == name
    ids = tok.encode("é | ") + [tok.token_id("<task:légende>")] + tok.encode("<->x")
    assert tok.decode(ids, skip_special_tokens=False) == "é | <task:légende><->x" and tok.decode(ids) == "é | <->x"


def test_json_round_trip(tok):
    again = TextTokenizer.from_json(tok.to_json())
    assert again.vocab_size == tok.vocab_size and again.special_tokens == tok.special_tokens
    for text in CORPUS + ["naïve café — 東京", "unseen words: quixotic zephyr"]:
        assert again.encode(text) == tok.encode(text)
        assert again.decode(again.encode(text)) == text


def test_training_is_deterministic(tok):
    again = TextTokenizer.train(CORPUS, vocab_size=600, extra_special_tokens=EXTRA)
    assert all(again.encode(t) == tok.encode(t) for t in CORPUS)


@pytest.mark.parametrize("kwargs,match", [
    (dict(texts=[], vocab_size=600), "training corpus is empty"),
    (dict(texts=iter(["", ""]), vocab_size=600), "training corpus is empty"),
    (dict(texts=CORPUS, vocab_size=256 + len(SPECIAL_TOKENS) - 1),
     rf"vocab_size {256 + len(SPECIAL_TOKENS) - 1} is too small.*at least {256 + len(SPECIAL_TOKENS)}"),
    (dict(texts=CORPUS, vocab_size=270, extra_special_tokens=EXTRA), "too small"),
    (dict(texts=CORPUS, vocab_size=600, extra_special_tokens=("<bos>",)),
     "'<bos>' is given twice or is built in"),
    (dict(texts=CORPUS, vocab_size=600, extra_special_tokens=("",)), "non-empty strings"),
    (dict(texts=CORPUS, vocab_size=600, extra_special_tokens="<task:x>"), "not one string"),
    (dict(texts="just one string", vocab_size=600), "not one string"),
    (dict(texts=["fine", 3], vocab_size=600), "training texts must be str; got int"),
])
def test_bad_training_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextTokenizer.train(**kwargs)


def test_bad_tokenizer_calls_raise(tok):
    with pytest.raises(ValueError, match="'<task:unknown>' is not a special token"):
        tok.token_id("<task:unknown>")
    with pytest.raises(ValueError, match="encode expects a str; got bytes"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match=r"outside \[0, "):
        tok.decode([tok.vocab_size])
    for ids in ([1.5], [True, 5], ["5"]):  # 1.5 and True read as id 1 (<eos>, skipped): an empty string
        with pytest.raises(ValueError, match="token ids must be integers, not bools or fractions"):
            tok.decode(ids)
    with pytest.raises(ValueError, match="token ids must be integers; got a torch.float32 tensor"):
        tok.decode(torch.tensor([5.0]))
    assert tok.decode(np.array([5, 6])) == tok.decode([5, 6])  # numpy integers are ids
    with pytest.raises(ValueError, match="not a serialized tokenizer"):
        TextTokenizer.from_json("{not json")


# --- TextEmbed -------------------------------------------------------------------------------

def _embed(gen, vocab=50, d=8, **cfg):
    torch.manual_seed(gen.initial_seed())
    return TextEmbed(TextConfig(vocab, **cfg), d)


def test_embed_tokens_and_positions(gen):
    embed = _embed(gen)
    ids = [3, 0, 49, 3, 7]
    tokens_LD, positions_L3 = embed(ids)
    assert tokens_LD.shape == (5, 8) and tokens_LD.dtype == torch.float32
    assert positions_L3.dtype == torch.int64
    assert positions_L3.tolist() == [[i, 0, 0] for i in range(5)]
    assert torch.equal(tokens_LD, embed.weight[ids])
    assert embed.weight is embed.embed.weight and embed.weight.shape == (50, 8)
    for other in (torch.tensor(ids), torch.tensor(ids, dtype=torch.int32), np.array(ids),
                  *(np.array(ids, dtype=t) for t in (np.uint8, np.uint16, np.uint32, np.uint64)),
                  torch.tensor(ids, dtype=torch.uint32)):  # unsigned ids too (torch reduces few of them)
        assert torch.equal(embed(other)[0], tokens_LD)


def test_embed_gradients_touch_used_rows_only(gen):
    embed = _embed(gen)
    tokens_LD, _ = embed([1, 4, 4])
    tokens_LD.sum().backward()
    used = embed.weight.grad.abs().sum(-1) > 0
    assert used.nonzero().flatten().tolist() == [1, 4]
    torch.testing.assert_close(embed.weight.grad[4], torch.full((8,), 2.0))


@pytest.mark.parametrize("ids,match", [
    ([], "text ids are empty"),
    (torch.zeros(0, dtype=torch.int64), "text ids are empty"),
    ([1, 50], r"text ids must be in \[0, 50\); got min 1, max 50"),
    (torch.tensor([-1, 2]), r"got min -1, max 2"),
    (np.array([2**63, 2], dtype=np.uint64), r"got min -9223372036854775808, max 2"),  # past int64
    (torch.tensor([1.0, 2.0]), "integer dtype; got torch.float32"),
    (torch.tensor([True, False]), "integer dtype; got torch.bool"),
    ([1, 2.0], "must hold only ints"),
    (torch.zeros(2, 3, dtype=torch.int64), r"must be 1-D \(L,\); got shape \(2, 3\)"),
    (list(range(11)), "text has 11 tokens; max_len is 10"),
    ("hello", "must be a torch.Tensor or numpy array; got str"),
])
def test_embed_bad_ids_raise(gen, ids, match):
    with pytest.raises(ValueError, match=match):
        _embed(gen, max_len=10)(ids)


# --- the registry ----------------------------------------------------------------------------

def test_build_embedders_defaults():
    embedders = build_embedders(8, 300)
    assert list(embedders) == list(MODALITIES) == ["text", "image", "audio", "video", "table"]
    assert list(MODALITIES.values()) == [0, 1, 2, 3, 4]
    for name, embed in embedders.items():
        assert embed.modality == name
        mp = embed.max_positions
        assert len(mp) == 3 and all(isinstance(m, int) and m >= 1 for m in mp)
    assert embedders["text"].weight.shape == (300, 8)
    assert embedders["text"].max_positions == (4096, 1, 1)


def test_build_embedders_overrides_and_drops():
    embedders = build_embedders(8, 300, {"text": TextConfig(300, max_len=64), "audio": None,
                                         "image": ImageConfig(patch=2, max_size=8)})
    assert list(embedders) == ["text", "image", "video", "table"]
    assert embedders["text"].max_positions == (64, 1, 1)
    assert embedders["image"].max_positions == (1, 4, 4)


@pytest.mark.parametrize("configs,match", [
    ({"speech": None}, r"unknown modalities \['speech'\]"),
    ({"image": AudioConfig()}, r"configs\['image'\] must be of type ImageConfig; got AudioConfig"),
    ({"text": TextConfig(200)}, "vocab_size is 200 but text_vocab_size is 300"),
])
def test_build_embedders_bad_configs_raise(configs, match):
    with pytest.raises(ValueError, match=match):
        build_embedders(8, 300, configs)
