"""Text: a byte-level BPE tokenizer trained by the project, and the token embedding.

Shapes: L tokens, D d_model, V vocabulary size.

Token ids are laid out as: the special tokens first (ids 0 .. S-1, built-in ones in the order of
`SPECIAL_TOKENS`, then the extra ones), then the 256 byte symbols, then the learned merges.
`TextTokenizer.encode` treats its input as plain text: a literal "<image>" typed by a user is
spelled out in bytes, never turned into the boundary token; the data pipeline inserts special
tokens by id (`token_id`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor, nn

from .image import to_tensor

SPECIAL_TOKENS: tuple[str, ...] = (
    "<bos>", "<eos>", "<sep>",
    "<image>", "</image>", "<audio>", "</audio>", "<video>", "</video>",
    "<table>", "</table>", "<text>", "</text>",
)
N_BYTES = 256


class TextTokenizer:
    """A byte-level BPE tokenizer (HF `tokenizers`) that the project trains on its own corpus.

    Why byte-level BPE: every string is a sequence of bytes and all 256 bytes are in the
    vocabulary, so no input ever maps to an unknown token and decoding inverts encoding exactly
    (any language, emoji, code); BPE training on a few MB takes seconds; and the whole tokenizer
    serializes to one JSON string (`to_json`), which is stored inside every checkpoint so a
    model always travels with the tokenizer it was trained with.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # encode spells "<bos>" etc. out as plain text
        self._special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()
                         if t.special}
        missing = [t for t in SPECIAL_TOKENS if t not in self._special]
        if missing:
            raise ValueError(f"tokenizer lacks the built-in special tokens {missing}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int,
              extra_special_tokens: Sequence[str] = ()) -> TextTokenizer:
        """Train on `texts`; `extra_special_tokens` are e.g. task prompts "<task:caption>".

        The vocabulary holds at most `vocab_size` entries (fewer when the corpus offers fewer
        merges); it must leave room for the 256 bytes and every special token.
        """
        if isinstance(extra_special_tokens, str):
            raise ValueError("extra_special_tokens must be a sequence of strings, not one string")
        specials = list(SPECIAL_TOKENS)
        for t in extra_special_tokens:
            if not isinstance(t, str) or not t:
                raise ValueError(f"special tokens must be non-empty strings; got {t!r}")
            if t in specials:
                raise ValueError(f"special token {t!r} is given twice or is built in")
            # one that the pre-tokenizer keeps whole ("|", "<->") could be a byte symbol or a
            # learned merge too, and share that id with the typed text that spells it
            if len(pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(t)) == 1:
                raise ValueError(f"special token {t!r} could share an id with typed text that spells it; mix "
                                 "letters and punctuation, as in '<task:name>'")
            specials.append(t)
        if isinstance(texts, str):
            raise ValueError("texts must be an iterable of strings, not one string")
        minimum = N_BYTES + len(specials)
        if not isinstance(vocab_size, int) or vocab_size < minimum:
            raise ValueError(f"vocab_size {vocab_size} is too small: the 256 bytes and "
                             f"{len(specials)} special tokens need at least {minimum}")
        seen = 0

        def corpus():
            nonlocal seen
            for t in texts:
                if not isinstance(t, str):
                    raise ValueError(f"training texts must be str; got {type(t).__name__}")
                seen += bool(t)
                yield t

        tok = Tokenizer(models.BPE())  # no unk token: the byte alphabet covers every input
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(corpus(), trainer)
        if seen == 0:
            raise ValueError("the training corpus is empty (no non-empty text)")
        assert tok.get_vocab_size() >= minimum
        return cls(tok)

    @classmethod
    def from_json(cls, s: str) -> TextTokenizer:
        """The inverse of `to_json`."""
        if not isinstance(s, str):
            raise ValueError(f"from_json expects a JSON str; got {type(s).__name__}")
        try:
            tok = Tokenizer.from_str(s)
        except Exception as e:  # tokenizers raises its own exception type
            raise ValueError(f"not a serialized tokenizer: {e}") from e
        return cls(tok)

    def to_json(self) -> str:
        """The whole tokenizer (merges, vocabulary, special tokens) as one JSON string."""
        return self._tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Every special token, in id order."""
        return tuple(sorted(self._special, key=self._special.__getitem__))

    def token_id(self, name: str) -> int:
        """The id of a special token, e.g. token_id("<image>") or token_id("<task:caption>")."""
        if name not in self._special:
            raise ValueError(f"{name!r} is not a special token of this tokenizer; "
                             f"known: {self.special_tokens}")
        return self._special[name]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, read as plain text (special-token spellings are not parsed)."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str; got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """The text of `ids`; special tokens are dropped unless `skip_special_tokens` is False."""
        if isinstance(ids, Tensor) and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
            raise ValueError(f"token ids must be integers; got a {ids.dtype} tensor")
        given = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        try:  # int() would take 1.5 (as id 1) and True
            ids = [None if isinstance(i, bool) else operator.index(i) for i in given]
        except TypeError:
            ids = [None]
        if None in ids:
            raise ValueError(f"token ids must be integers, not bools or fractions; got {given[:5]}")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside [0, {self.vocab_size})")
        if skip_special_tokens:
            return self._tok.decode(ids, skip_special_tokens=True)
        # special tokens are written as they are named: the byte-level decoder would read a
        # name's Latin-1 letters ("<task:légende>") as single bytes
        names = {i: t for t, i in self._special.items()}
        parts, run = [], []
        for i in ids:
            if i in names:
                parts += [self._tok.decode(run, skip_special_tokens=False) if run else "", names[i]]
                run = []
            else:
                run.append(i)
        parts.append(self._tok.decode(run, skip_special_tokens=False) if run else "")
        return "".join(parts)


@dataclass
class TextConfig:
    """vocab_size: the tokenizer's `vocab_size`; max_len: the longest sequence accepted (sizes
    the position table); init_std: std of the embedding initialization."""

    vocab_size: int
    max_len: int = 4096
    init_std: float = 0.02

    def __post_init__(self):
        if self.vocab_size < 1:
            raise ValueError(f"TextConfig.vocab_size must be >= 1; got {self.vocab_size}")
        if self.max_len < 1:
            raise ValueError(f"TextConfig.max_len must be >= 1; got {self.max_len}")


class TextEmbed(nn.Module):
    """Token ids -> (tokens_LD, positions_L3) with positions (i, 0, 0).

    `.weight` (V, D) is the embedding table, exposed so an output head can be tied to it.
    """

    modality = "text"

    def __init__(self, cfg: TextConfig, d_model: int):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1; got {d_model}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)

    @property
    def weight(self) -> nn.Parameter:
        return self.embed.weight

    @property
    def max_positions(self) -> tuple[int, int, int]:
        """Exclusive bounds of (sequence index, -, -)."""
        return (self.cfg.max_len, 1, 1)

    def prepare(self, ids: Any) -> tuple[Tensor, Tensor]:
        """ids: 1-D int tensor/array or list of ints (L,) -> ids (L,) int64, positions (L, 3)
        int64 (i, 0, 0), both where the ids are: the checks, no parameters."""
        if isinstance(ids, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError("text ids given as a list must hold only ints")
            ids_L = torch.tensor(ids, dtype=torch.int64)
        else:
            ids_L = to_tensor(ids, "text ids")
        if ids_L.dtype == torch.bool or ids_L.is_floating_point() or ids_L.is_complex():
            raise ValueError(f"text ids must have an integer dtype; got {ids_L.dtype}")
        if ids_L.dim() != 1:
            raise ValueError(f"text ids must be 1-D (L,); got shape {tuple(ids_L.shape)}")
        L = ids_L.shape[0]
        if L == 0:
            raise ValueError("text ids are empty")
        if L > self.cfg.max_len:
            raise ValueError(f"text has {L} tokens; max_len is {self.cfg.max_len}")
        if not ids_L.is_signed() and ids_L.dtype != torch.uint8:  # torch reduces few unsigned types
            ids_L = ids_L.to(torch.int64)  # uint64 past 2^63 turns negative: refused below
        lo, hi = int(ids_L.min()), int(ids_L.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"text ids must be in [0, {self.cfg.vocab_size}); got min {lo}, max {hi}")
        positions_L3 = torch.zeros(L, 3, dtype=torch.int64, device=ids_L.device)
        positions_L3[:, 0] = torch.arange(L, device=ids_L.device)
        return ids_L.to(torch.int64), positions_L3

    def project(self, ids_N: Tensor) -> Tensor:
        """The ids of one text or of many, concatenated (N,) -> tokens (N, D)."""
        return self.embed(ids_N.to(device=self.embed.weight.device))

    def forward(self, ids: Any) -> tuple[Tensor, Tensor]:
        """ids: 1-D int tensor/array or list of ints (L,) -> tokens (L, D), positions (L, 3)."""
        ids_L, positions_L3 = self.prepare(ids)
        return self.project(ids_L), positions_L3.to(self.embed.weight.device)
