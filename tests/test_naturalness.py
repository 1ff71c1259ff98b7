"""The naturalness yardstick (mingpt.naturalness): a proper distribution, and an order that says what it
should: real reviews read more likely than the same characters shuffled, and than samples that pile up one
sentiment's plainest characters (the sampling defaults before they were chosen on naturalness)."""
import math
import random

import pytest

from conftest import shared_csv
from mingpt.data.corpus import load_csv, load_embedded_corpus
from mingpt.naturalness import END, CharNgramModel

# Written by the 10-minute speedrun model at the earlier defaults (guidance 8 on the first 8 tokens, then 1.5;
# temperature 1.25; top-p 0.98), quoted in the issue that asked for this measure.
WORD_PILED = ["剧情烂毁烂烂片毁毁招，打空必发少都不费包了年末坑号头军官商真烂于丹搞的逼票大多了",
              "剧情毁啊毁毁烂片毁徐想破完了着剧不要瞎什么了",
              "好看~泪泪腾~很舒舒长还是亲情~.治愈超伤啊>VED效陪手法的高格完美首啦好意"]


def shuffled(text: str, seed: int) -> str:
    chars = list(text)
    random.Random(seed).shuffle(chars)
    return "".join(chars)


@pytest.mark.parametrize("order", [1, 2, 4])
def test_probabilities_over_every_character_and_the_end_sum_to_one(order):
    model = CharNgramModel(["好看好看", "难看", "好好看", "看了"], order=order)
    symbols = sorted(model.counts[1][""]) + ["没"]  # the characters seen (and the boundaries), one unseen
    for context in ["", "好", "好看", "难看了", "没见过"]:
        padded = "\x02" * (order - 1) + context
        total = sum(model.probability(padded, c) for c in symbols)
        assert math.isclose(total, 1.0, rel_tol=1e-12), (context, total)
    assert model.probability("\x02" * (order - 1) + "好", "看") > model.probability("\x02" * (order - 1) + "好", "难")


def test_known_answer_of_a_unigram_model():
    """order 1: P(c) = (count - 0.75 + 0.75 * distinct / |V|) / total, |V| = distinct + 1 (any unseen)."""
    model = CharNgramModel(["aab"], order=1)  # a:2, b:1, end:1
    assert math.isclose(model.probability("", "a"), (2 - 0.75 + 0.75 * 3 / 4) / 4)
    assert math.isclose(model.nll_per_char(["ab"]), -(math.log(model.probability("", "a"))
                                                       + math.log(model.probability("", "b"))
                                                       + math.log(model.probability("", END))) / 3)


def test_the_prompt_is_context_not_scored():
    model = CharNgramModel(["好看极了", "好看", "难看极了"])
    whole, after = model.nll_per_char(["好看极了"]), model.nll_per_char(["好看极了"], prompt="好看")
    assert whole != after and after < whole  # 极了 after 好看 is likelier than the review's first characters


def test_real_reviews_read_more_likely_than_their_characters_shuffled():
    reviews = [r.text for r in load_embedded_corpus()[0]]
    random.Random(0).shuffle(reviews)
    model = CharNgramModel(reviews[500:])
    held_out = reviews[:500]
    real = model.nll_per_char(held_out)
    mixed = model.nll_per_char([shuffled(t, i) for i, t in enumerate(held_out)])
    assert real + 1.0 < mixed, (real, mixed)


def test_real_movie_reviews_read_more_likely_than_word_piled_samples():
    comments, _ = load_csv(shared_csv("douban_comments_train.csv"))
    model = CharNgramModel(r.text for r in comments)
    reviews, _ = load_csv(shared_csv("movie_reviews_5k.csv"))
    real = model.nll_per_char([r.text for r in reviews[:500]])
    piled = model.nll_per_char(WORD_PILED)
    assert real + 0.5 < piled, (real, piled)
