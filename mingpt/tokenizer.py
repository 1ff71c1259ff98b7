"""Tokenizers behind one small interface, with the special tokens of the `review` layout, saved as JSON.

- `CharTokenizer`: one token per character (the default).
- `BPETokenizer`: byte-level BPE trained with the Hugging Face `tokenizers` library.
"""
import json

PAD, BOS, EOS, POS, NEG = "<pad>", "<bos>", "<eos>", "<pos>", "<neg>"
SPECIAL_TOKENS = (PAD, BOS, EOS, POS, NEG)
# Begins the reviews of an extra training source in place of <bos> (data.prepare's extra_train), so that the
# model learns that source apart and <bos> asks for reviews like the user's own. It follows SPECIAL_TOKENS.
EXTRA_BOS = "<bos:extra>"
RESERVED_STRINGS = SPECIAL_TOKENS + (EXTRA_BOS,)  # every special token a tokenizer may hold: no review holds one
SENTIMENT_TOKENS = {"pos": POS, "neg": NEG}


class UnknownCharacterError(ValueError):
    """A text holds characters that are not in the vocabulary."""


class CharTokenizer:
    kind = "char"

    def __init__(self, chars, special_tokens=SPECIAL_TOKENS):
        chars = list(chars)
        if len(set(chars)) != len(chars):
            raise ValueError("tokenizer characters must be unique")
        if any(len(c) != 1 for c in chars):
            raise ValueError("a character tokenizer holds single characters only")
        self.special_tokens = tuple(special_tokens)
        self.itos = list(self.special_tokens) + chars
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        if len(self.itos) > 65535:
            raise ValueError(f"vocabulary of {len(self.itos)} does not fit uint16 token files")

    @classmethod
    def train(cls, texts, special_tokens=SPECIAL_TOKENS):
        return cls(sorted(set().union(*map(set, texts))), special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def token_id(self, token: str) -> int:
        return self.stoi[token]

    def encode(self, text: str) -> list:
        unknown = sorted({c for c in text if c not in self.stoi or c in self.special_tokens})
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise UnknownCharacterError(
                f"{len(unknown)} character(s) not in the vocabulary of {self.vocab_size}: {shown}")
        return [self.stoi[c] for c in text]

    def decode(self, ids, skip_special: bool = True) -> str:
        n_special = len(self.special_tokens)
        return "".join(self.itos[i] for i in ids if not (skip_special and i < n_special))

    def to_dict(self) -> dict:
        return {"type": self.kind, "special_tokens": list(self.special_tokens),
                "chars": self.itos[len(self.special_tokens):]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def save(self, path: str):
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())


class BPETokenizer:
    """Byte-level BPE: any text encodes, so there are no unknown characters."""
    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        has_extra_bos = hf_tokenizer.token_to_id(EXTRA_BOS) is not None
        self.special_tokens = SPECIAL_TOKENS + ((EXTRA_BOS,) if has_extra_bos else ())
        for i, token in enumerate(self.special_tokens):
            if hf_tokenizer.token_to_id(token) != i:
                raise ValueError(f"BPE tokenizer must hold special token {token} at id {i}")
        if self.vocab_size > 65535:
            raise ValueError(f"vocabulary of {self.vocab_size} does not fit uint16 token files")

    @classmethod
    def train(cls, texts, vocab_size: int = 2000, special_tokens=SPECIAL_TOKENS):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def token_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens.index(token)
        ids = self.encode(token)
        if len(ids) != 1:
            raise ValueError(f"{token!r} is not a single BPE token")
        return ids[0]

    def encode(self, text: str) -> list:
        smuggled = [t for t in self.special_tokens if t in text]
        if smuggled:
            raise UnknownCharacterError(f"text holds special-token strings {smuggled}")
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def to_dict(self) -> dict:
        return {"type": self.kind, "tokenizers_json": self.hf.to_str()}

    def save(self, path: str):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)


TOKENIZERS = {"char": CharTokenizer, "bpe": BPETokenizer}


def train_tokenizer(kind: str, texts, vocab_size: int = 2000, extra_bos: bool = False):
    """A tokenizer of `kind` for texts; with extra_bos it also holds EXTRA_BOS."""
    special_tokens = SPECIAL_TOKENS + ((EXTRA_BOS,) if extra_bos else ())
    if kind == "char":
        return CharTokenizer.train(texts, special_tokens)
    if kind == "bpe":
        try:
            return BPETokenizer.train(texts, vocab_size, special_tokens)
        except ImportError:
            raise ValueError("--tokenizer bpe needs the `tokenizers` package: pip install tokenizers") from None
    raise ValueError(f"unknown tokenizer {kind!r}; choose one of {', '.join(TOKENIZERS)}")


def review_begin_ids(tokenizer) -> list:
    """The ids that begin a review of the review layout: <bos>, and EXTRA_BOS where the tokenizer holds it."""
    return [tokenizer.token_id(t) for t in (BOS, EXTRA_BOS) if t in tokenizer.special_tokens]


def extend_tokenizer(base, texts):
    """A tokenizer that keeps every id of `base` and covers `texts` (union vocabulary for fine-tuning)."""
    if base.kind == "bpe":
        return base
    known = set(base.itos)
    new = sorted(set().union(*map(set, texts)) - known)
    return CharTokenizer(base.itos[len(base.special_tokens):] + new, base.special_tokens)


def tokenizer_from_dict(data: dict):
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "char":
        return CharTokenizer(data["chars"], data["special_tokens"])
    if kind == "bpe":
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("this BPE tokenizer needs the `tokenizers` package: pip install tokenizers") from None
        return BPETokenizer(Tokenizer.from_str(data["tokenizers_json"]))
    raise ValueError(f"unknown tokenizer type {kind!r}")


def load_tokenizer(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"tokenizer file not found: {path} (run `python -m mingpt.prepare` first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"tokenizer file {path} is not valid JSON: {e}") from None
    try:
        return tokenizer_from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"tokenizer file {path} is malformed: {e}") from None
