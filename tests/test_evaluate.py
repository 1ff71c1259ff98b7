import pytest

from conftest import shared_csv
from mingpt.corpus import Review
from mingpt.evaluate import CopyDetector, SentimentJudge, distinct_n, load_judge_sets, parse_prompts


def test_distinct_n_on_known_cases():
    assert distinct_n(["abab"], 1) == 2 / 4
    assert distinct_n(["abab"], 2) == 2 / 3          # ab, ba, ab
    assert distinct_n(["ab", "ab"], 2) == 1 / 2
    assert distinct_n(["a"], 2) == 0.0


def test_copies_exact_and_near_exact():
    detector = CopyDetector(["这部电影真的非常好看，推荐大家去看", "剧情拖沓，浪费时间"])
    assert detector.is_copy("剧情拖沓，浪费时间")
    assert detector.is_copy("这部电影真的非常好看，推荐大家去看！")   # one character added
    assert not detector.is_copy("这部电影真的非常难看")
    assert not detector.is_copy("完全不同的一句话")
    assert detector.novelty(["剧情拖沓，浪费时间", "完全不同的一句话", "另一句新的话呀", "又一句"]) == 0.75


def test_judge_learns_sentiment_from_characters():
    positive = ["好看", "很好看", "非常精彩", "喜欢", "推荐", "感动", "好看推荐"] * 5
    negative = ["难看", "很难看", "非常无聊", "讨厌", "失望", "烂片", "难看失望"] * 5
    judge = SentimentJudge([Review(t, "pos") for t in positive] + [Review(t, "neg") for t in negative])
    assert judge.predict(["好看精彩", "无聊烂片"]) == ["pos", "neg"]
    assert judge.agreement(["好看", "喜欢", "难看"], "pos") == pytest.approx(2 / 3)
    assert judge.accuracy([Review("精彩", "pos"), Review("失望", "neg")]) == 1.0


def test_judge_refuses_the_generators_own_data(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("review,sentiment\n好,1\n差,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="generator's own training data"):
        load_judge_sets(str(path), None, ["other.csv", str(path)])


def test_prompts_parse():
    assert parse_prompts("好看:pos,难看:neg") == [("好看", "pos"), ("难看", "neg")]
    with pytest.raises(ValueError, match="START:pos"):
        parse_prompts("好看")


def test_judge_scores_real_held_out_comments():
    train, test, _, _ = load_judge_sets(shared_csv("douban_comments_train.csv"),
                                        shared_csv("douban_comments_test.csv"), ["movie_reviews_5k.csv"])
    judge = SentimentJudge(train)
    assert judge.accuracy(test[:4000]) > 0.8
