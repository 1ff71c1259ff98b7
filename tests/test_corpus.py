"""Sources -> labelled reviews: CSV parsing, the embedded corpus, dedupe, drop counts, the split."""
import pytest

from conftest import shared_csv, synthetic_reviews
from mingpt.data.corpus import DataError, Review, load_csv, load_embedded_corpus, split_reviews
from mingpt.data.tokens import summary_line, write_data_dir


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_csv_handles_bom_crlf_quotes_empty_and_unknown_labels(tmp_path):
    path = write(tmp_path / "r.csv", '\ufeffreview,sentiment\r\n"好看,真的",1\r\n"难看\n太差",0\r\n,1\r\n还行,5\r\n好看,1\r\n"好看,真的",1\r\n')
    reviews, drops = load_csv(path)
    assert reviews == [Review("好看,真的", "pos"), Review("难看 太差", "neg"), Review("好看", "pos")]
    assert drops == {"empty review": 1, "unknown label '5'": 1, "duplicate": 1}


def test_html_entities_are_unescaped_and_counted(tmp_path):
    """Scraped reviews carry &gt; and the like (26 rows of the 5k movie reviews do); a model would learn them."""
    path = write(tmp_path / "h.csv", "review,sentiment\n好看&gt;_&lt;,1\n&quot;烂&quot; &amp; 差,0\n好看>_<,1\n还行,1\n")
    reviews, drops = load_csv(path)
    assert reviews == [Review("好看>_<", "pos"), Review('"烂" & 差', "neg"), Review("还行", "pos")]
    meta = write_data_dir(reviews, drops, str(tmp_path / "out"), block_size=16, source=path)
    assert meta["unescaped"] == 2 and meta["dropped"] == {"duplicate": 1}  # the third row repeats the first
    assert "2 rows' HTML entities unescaped" in summary_line(meta)


def test_csv_douban_columns_and_custom_labels(tmp_path):
    path = write(tmp_path / "d.csv", "CONTENT,RATING,label\n很好,5,1\n很差,1,-1\n")
    reviews, _ = load_csv(path)
    assert [r.sentiment for r in reviews] == ["pos", "neg"]
    reviews, _ = load_csv(path, text_column="CONTENT", label_column="RATING", pos_labels=["5"], neg_labels=["1"])
    assert [r.sentiment for r in reviews] == ["pos", "neg"]


def test_conflicting_labels_are_dropped(tmp_path):
    path = write(tmp_path / "c.csv", "review,sentiment\n一般,1\n一般,0\n好,1\n")
    reviews, drops = load_csv(path)
    assert reviews == [Review("好", "pos")]
    assert drops["labelled both positive and negative"] == 2  # both rows


@pytest.mark.parametrize("content, message", [
    ("body,stars\nabc,1\n", "cannot guess the text column"),
    ("text,stars\nabc,1\n", "cannot guess the label column"),
    ("", "empty file"),
    ("review,sentiment\n\"unclosed,1\n", "malformed CSV|no usable"),
])
def test_csv_errors_name_the_problem(tmp_path, content, message):
    path = write(tmp_path / "bad.csv", content)
    with pytest.raises(DataError, match=message):
        reviews, drops = load_csv(path)
        write_data_dir(reviews, drops, str(tmp_path / "out"), source=path)


def test_csv_not_utf8_and_missing_file(tmp_path):
    path = write(tmp_path / "gbk.csv", "review,sentiment\n好看,1\n", encoding="gbk")
    with pytest.raises(DataError, match="not UTF-8"):
        load_csv(path, encoding="utf-8")  # named by the user; auto reads it as GB18030 (test_formats.py)
    with pytest.raises(DataError, match="not found"):
        load_csv(str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match="no text column 'body'"):
        load_csv(write(tmp_path / "ok.csv", "review,sentiment\n好,1\n"), text_column="body")


def test_split_is_deterministic_and_disjoint():
    reviews = synthetic_reviews(100)
    train_a, val_a = split_reviews(reviews, 0.1, seed=1)
    train_b, val_b = split_reviews(reviews, 0.1, seed=1)
    assert (train_a, val_a) == (train_b, val_b)
    assert len(val_a) == 10 and not set(train_a) & set(val_a)
    assert split_reviews(reviews, 0.1, seed=2)[1] != val_a


def test_embedded_corpus_is_deduplicated():
    reviews, drops = load_embedded_corpus()
    assert 17_000 < len(reviews) < 17_500
    assert drops["duplicate"] > 17_000
    assert len({r.text for r in reviews}) == len(reviews)


def test_shared_movie_reviews_load():
    reviews, drops = load_csv(shared_csv("movie_reviews_5k.csv"))
    assert 4_500 < len(reviews) <= 5_000
    assert 0.8 < sum(r.sentiment == "pos" for r in reviews) / len(reviews) < 0.9


def test_shared_douban_loads_with_minus_one_labels():
    reviews, drops = load_csv(shared_csv("douban_comments_train.csv"))
    assert len(reviews) > 19_000 and not any(k.startswith("unknown label") for k in drops)
    assert abs(sum(r.sentiment == "neg" for r in reviews) / len(reviews) - 0.5) < 0.02
