import pytest
import torch

from conftest import shared_csv
from mingpt import GPT, GPTConfig
from mingpt.data.corpus import Review
from mingpt.evaluate import DEFAULT_PROMPTS, load_judge_sets, parse_prompts
from mingpt.metrics import CopyDetector, SentimentJudge, distinct_n, nats_per_char, review_windows, statistics
from mingpt.data.layouts import get_layout
from mingpt.tokenizer import BOS, EOS, SENTIMENT_TOKENS, CharTokenizer


def test_distinct_n_on_known_cases():
    assert distinct_n(["abab"], 1) == 2 / 4
    assert distinct_n(["abab"], 2) == 2 / 3          # ab, ba, ab
    assert distinct_n(["ab", "ab"], 2) == 1 / 2
    assert distinct_n(["a"], 2) == 0.0


def test_distinct_n_counts_what_follows_the_prompt():
    judge = SentimentJudge([Review(t, "pos") for t in ("好看", "喜欢", "精彩")] + [Review(t, "neg") for t in
                                                                              ("难看", "无聊", "失望")])
    reference = type("Reference", (), {"judge": judge, "copies": CopyDetector(["剧情好看"]), "naturalness": None})()
    texts = ["剧情好看", "剧情无聊", "剧情"]
    measured = statistics(texts, "pos", reference, prompt="剧情")
    assert measured["distinct_2"] == 2 / 2 and measured["distinct_1"] == 4 / 4  # 好看, 无聊; the prompt's 剧情 not
    assert statistics(texts, "pos", reference)["distinct_2"] == 5 / 7  # 剧情 thrice, 情好, 好看, 情无, 无聊
    assert measured["novelty"] == 2 / 3 and measured["mean_length"] == pytest.approx(10 / 3)


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
    assert parse_prompts("剧情,好看:neg") == [("剧情", "pos"), ("剧情", "neg"), ("好看", "neg")]
    with pytest.raises(ValueError, match="START:pos"):
        parse_prompts("好看:happy")
    assert len(parse_prompts(DEFAULT_PROMPTS)) == 16


def test_judge_scores_real_held_out_comments():
    train, test, _, _ = load_judge_sets(shared_csv("douban_comments_train.csv"),
                                        shared_csv("douban_comments_test.csv"), ["movie_reviews_5k.csv"])
    judge = SentimentJudge(train)
    assert judge.accuracy(test[:4000]) > 0.8


@pytest.mark.parametrize("length, block", [(5, 16), (16, 16), (17, 16), (40, 16), (41, 7)])
def test_review_windows_score_every_character_and_the_end_once(length, block):
    ids = [100, 101] + list(range(length)) + [99]  # context, sentiment, characters, end
    rows = review_windows(ids, block, pad_id=-7)
    assert all(len(x) == len(y) == block for x, y in rows)
    scored = [t for _, y in rows for t in y if t != -1]
    assert scored == ids[2:]
    for x, y in rows:  # each target is the token after its input, within a window of the review
        pairs = [(a, b) for a, b in zip(x, y) if b != -1]
        assert all(ids.index(b) == ids.index(a) + 1 for a, b in pairs)


def test_nats_per_char_is_the_mean_loss_of_characters_and_end_given_the_sentiment():
    tokenizer = CharTokenizer(sorted(set("好看难无聊的电影")))
    layout = get_layout("review")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=tokenizer.vocab_size)).eval()
    reviews = [("pos", "好看"), ("neg", "难看无聊的电影难看无聊")]  # the second is longer than the block
    expected, characters = 0.0, 0
    with torch.no_grad():
        for sentiment, text in reviews:
            ids = [tokenizer.token_id(BOS), tokenizer.token_id(SENTIMENT_TOKENS[sentiment])]
            ids += tokenizer.encode(text) + [tokenizer.token_id(EOS)]
            for j in range(2, len(ids)):  # windows of 8 sliding by 4: each target with its window's context
                start = 0 if j <= 8 else 4 * ((j - 9) // 4 + 1)  # the window that scores j
                logits, _ = model(torch.tensor([ids[start:j]]))
                expected -= logits[0, -1].log_softmax(-1)[ids[j]].item()
            characters += len(text) + 1
    assert nats_per_char(model, tokenizer, layout, reviews, batch_size=2) == pytest.approx(expected / characters,
                                                                                         rel=1e-5)
