"""Character-level tokenizer with the special tokens of the `review` layout, saved as JSON."""
import json

PAD, BOS, EOS, POS, NEG = "<pad>", "<bos>", "<eos>", "<pos>", "<neg>"
SPECIAL_TOKENS = (PAD, BOS, EOS, POS, NEG)
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
    def train(cls, texts):
        return cls(sorted(set().union(*map(set, texts))))

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


def tokenizer_from_dict(data: dict):
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "char":
        return CharTokenizer(data["chars"], data["special_tokens"])
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
