import json

import pytest

from mingpt.tokenizer import (BOS, EOS, SPECIAL_TOKENS, CharTokenizer, UnknownCharacterError, load_tokenizer)


def test_round_trip_and_special_tokens_first():
    tok = CharTokenizer.train(["好看的电影！", "难看 ok"])
    text = "好看 ok！"
    assert tok.decode(tok.encode(text)) == text
    assert tok.itos[:len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    ids = [tok.token_id(BOS)] + tok.encode("好") + [tok.token_id(EOS)]
    assert tok.decode(ids) == "好"
    assert tok.decode(ids, skip_special=False) == f"{BOS}好{EOS}"


def test_unknown_character_error_names_it():
    tok = CharTokenizer.train(["好看"])
    with pytest.raises(UnknownCharacterError, match="'难'"):
        tok.encode("难看")


def test_special_token_text_is_not_smuggled_in_as_characters():
    tok = CharTokenizer.train(["<bos>"])
    assert tok.decode(tok.encode("<bos>")) == "<bos>"
    assert tok.encode("<") != [tok.token_id(BOS)]


def test_save_load_json(tmp_path):
    tok = CharTokenizer.train(["你好，世界"])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "char" and "你" in data["chars"]
    loaded = load_tokenizer(str(path))
    assert loaded.itos == tok.itos


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(str(bad))
    other = tmp_path / "other.json"
    other.write_text('{"type": "wordpiece"}', encoding="utf-8")
    with pytest.raises(ValueError, match="wordpiece"):
        load_tokenizer(str(other))
