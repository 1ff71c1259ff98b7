"""Real-world review files: GBK / GB18030 CSVs from Excel on a Chinese Windows, TSV, JSON Lines, UTF-16,
word labels, and the clear errors of files that cannot be read. Every fixture is written here."""
import json
import re

import pytest

from mingpt import prepare
from mingpt.data.corpus import DataError, Review, load_table

GB18030_BOM = "\ufeff".encode("gb18030")  # b"\x84\x31\x95\x33"
ROWS = [("好看，演员很棒", "1"), ("难看，浪费时间", "0"), ("值得一看", "1"), ("剧情拖沓", "-1")]
EXPECTED = [Review("好看，演员很棒", "pos"), Review("难看，浪费时间", "neg"),
            Review("值得一看", "pos"), Review("剧情拖沓", "neg")]


def write(path, text, encoding="utf-8", prefix=b""):
    path.write_bytes(prefix + text.encode(encoding))
    return str(path)


def csv_text(sep=","):
    return f"review{sep}sentiment\r\n" + "".join(f"{t}{sep}{label}\r\n" for t, label in ROWS)


def run_prepare(capsys, *args):
    code = prepare.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_gbk_csv_from_excel_reads_as_gb18030(tmp_path, capsys):
    path = write(tmp_path / "excel.csv", csv_text(), encoding="gbk")
    with pytest.raises(UnicodeDecodeError):
        open(path, encoding="utf-8").read()
    reviews, drops, read_as = load_table(path)
    assert reviews == EXPECTED and not drops and read_as == "CSV, GB18030"
    code, out, _ = run_prepare(capsys, "--csv", path, "--data_dir", str(tmp_path / "d"), "--val_fraction", "0.25")
    assert code == 0 and f"{path} (read as CSV, GB18030): kept 4 reviews" in out
    meta = json.loads((tmp_path / "d" / "meta.json").read_text(encoding="utf-8"))
    assert meta["source"] == path and meta["read_as"] == "CSV, GB18030"


def test_gb18030_with_a_byte_order_mark(tmp_path):
    path = write(tmp_path / "bom.csv", csv_text() + "𠀀字,1\r\n", encoding="gb18030", prefix=GB18030_BOM)
    reviews, _, read_as = load_table(path)
    assert reviews == EXPECTED + [Review("𠀀字", "pos")] and read_as == "CSV, GB18030"
    assert load_table(path, encoding="gb18030")[0] == reviews
    with pytest.raises(DataError, match=r"not UTF-8 text \(bad byte 0x84 on line 1\)"):
        load_table(path, encoding="utf-8")


def test_utf8_stays_utf8_and_a_named_encoding_is_used(tmp_path):
    assert load_table(write(tmp_path / "u.csv", csv_text(), prefix=b"\xef\xbb\xbf"))[2] == "CSV, UTF-8"
    path = write(tmp_path / "big5.csv", "review,sentiment\n好看,1\n難看,0\n", encoding="big5")
    reviews, _, read_as = load_table(path, encoding="big5")
    assert reviews == [Review("好看", "pos"), Review("難看", "neg")] and read_as == "CSV, Big5"


def test_tsv_detected_or_named(tmp_path):
    text = 'text\tlabel\n"好看\t真的"\t1\n难看, 太差\t0\n'
    path = write(tmp_path / "reviews.tsv", text)
    reviews, _, read_as = load_table(path)
    assert reviews == [Review("好看 真的", "pos"), Review("难看, 太差", "neg")] and read_as == "TSV, UTF-8"
    assert load_table(path, fmt="tsv")[0] == reviews
    with pytest.raises(DataError, match="is it tab-separated[?] pass --format tsv"):
        load_table(path, fmt="csv")


def test_excel_unicode_text_is_utf16_tsv(tmp_path):
    path = write(tmp_path / "excel.txt", csv_text("\t"), encoding="utf-16")  # starts with FF FE
    reviews, _, read_as = load_table(path)
    assert reviews == EXPECTED and read_as == "TSV, UTF-16"


def test_json_lines(tmp_path, capsys):
    lines = [{"text": "好看", "label": 1}, {"text": "难看", "label": 0}, {"text": "一般"},
             {"text": "  ", "label": 1}, {"text": "还行", "label": "pos"}, {"text": "很差", "label": -1.0}]
    path = write(tmp_path / "reviews.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in lines) + "\n\n")
    reviews, drops, read_as = load_table(path)
    kept = (("好看", "pos"), ("难看", "neg"), ("还行", "pos"), ("很差", "neg"))
    assert reviews == [Review(text, sentiment) for text, sentiment in kept]
    assert drops == {"missing label": 1, "empty review": 1} and read_as == "JSONL, UTF-8"
    code, out, _ = run_prepare(capsys, "--csv", path, "--format", "jsonl", "--data_dir", str(tmp_path / "d"),
                               "--val_fraction", "0.25")
    assert code == 0 and "(read as JSONL, UTF-8): kept 4 reviews, dropped 2 (1 empty review, 1 missing label)" in out


def test_word_labels_by_default_and_by_flag(tmp_path, capsys):
    path = write(tmp_path / "words.csv", "review,sentiment\n好看,Positive\n难看,negative\n精彩,pos\n无聊,NEG\n"
                                         "喜欢,好评\n失望,差评\n一般,中评\n")
    reviews, drops, _ = load_table(path)
    assert [r.sentiment for r in reviews] == ["pos", "neg"] * 3 and drops == {"unknown label '中评'": 1}
    custom = write(tmp_path / "custom.csv", "review,sentiment\n好看,推荐\n难看,不推荐\n一般,中评\n")
    code, out, _ = run_prepare(capsys, "--csv", custom, "--pos_labels", "推荐", "--neg_labels", "不推荐,中评",
                               "--data_dir", str(tmp_path / "d"), "--val_fraction", "0.4")
    assert code == 0 and "kept 3 reviews" in out and "1 positive / 2 negative" in out
    code, _, err = run_prepare(capsys, "--csv", custom, "--pos_labels", "推荐", "--neg_labels", "推荐",
                               "--data_dir", str(tmp_path / "e"))
    assert code == 2 and "label '推荐' is given as both positive and negative" in err


@pytest.mark.parametrize("content, args, message", [
    (b"review,sentiment\nok,1\n\xff\xfe\x80,0\n", [],
     r"not UTF-8 or GB18030 text \(UTF-8: bad byte 0xff on line 3; GB18030: bad byte 0xff on line 3\); "
     r"name its encoding with --encoding"),
    ("review,sentiment\n好看,1\n".encode("gbk"), ["--encoding", "utf-8"],
     r"not UTF-8 text \(bad byte 0xba on line 2\)"),
    (b"review,sentiment\nx,1\n", ["--encoding", "klingon"], "unknown encoding 'klingon'"),
    (b'{"text": "x", "label": 1}\n{"text": "y", "label": \n', [],
     "malformed JSON Lines: line 2 is not JSON: Expecting value at column 24"),
    (b'{"text": "x", "label": 1}\n[1, 2]\n', [], "malformed JSON Lines: line 2 is not a JSON object but list"),
    (b'{"body": "x", "label": 1}\n', [], r"cannot guess the text column among \['body', 'label'\]"),
    (b"\n\n", ["--format", "jsonl"], "empty file, expected one JSON object per line"),
    (b"review\tsentiment\n\"x\t1\n", [], "malformed TSV: EOF inside string"),
    (b"review,sentiment\nx\x00y,1\n", [], "contains NUL bytes"),
])
def test_unreadable_files_get_clear_errors(tmp_path, capsys, content, args, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    code, _, err = run_prepare(capsys, "--csv", str(path), "--data_dir", str(tmp_path / "d"), *args)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"prepare: error: {path}: ") or "klingon" in err
    assert re.search(message, err), err
