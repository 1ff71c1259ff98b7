"""The serving engine's continuous batching against the samplers: rows that join between steps, each at its
own position, draw what the reference loop draws; samples leave at once; candidates, logprobs, seeds; the
stop matcher; the watchdog."""
import random
import threading

import pytest
import torch

from conftest import wait_until
from mingpt.checkpoint import load
from mingpt.sample import compiled
from mingpt.data.layouts import get_layout
from mingpt.sample.candidates import conditioning_margin
from mingpt.sample.engine import generate
from mingpt.sample.reviews import guidance_rows, prompt_row
from mingpt.sample.settings import SamplingSettings
from mingpt.sample.streaming import StopMatcher, TextStream
from mingpt.serve.batch import RunningBatch
from mingpt.serve.engine import Engine, EngineStopped, QueueFull, Request
from mingpt.tokenizer import CharTokenizer

LAYOUT = get_layout("review")
requires_cached = pytest.mark.skipif(compiled.cached_sampler_unavailable_reason() is not None,
                                     reason=f"{compiled.cached_sampler_unavailable_reason()}")
# guided on the first 3 tokens, then not: the guidance rows leave the batch after the third token
GREEDY_GUIDED = SamplingSettings(temperature=0.0, guidance=3.0, guidance_tokens=3, guidance_after=1.0,
                                 no_repeat_ngram_size=0, candidates=1)


class Collected:
    """A request's events, by sample."""

    def __init__(self):
        self.events, self.lock = [], threading.Lock()

    def __call__(self, event):
        with self.lock:
            self.events.append(event)

    def text(self, index=0) -> str:
        return "".join(e.text for e in self.events if e.index == index)

    def ends(self) -> list:
        return [e.finish_reason for e in self.events if e.finish_reason]

    def logprobs(self, index=0) -> list:
        return [entry for e in self.events if e.index == index for entry in e.logprobs]


@pytest.fixture(params=[pytest.param("compiled", marks=requires_cached), "model"])
def served(serve_ckpt, request):
    """The checkpoint and a maker of engines, each step run by one decoder (mingpt.serve.rows)."""
    loaded = load(serve_ckpt)
    engines = []

    def make(**options):
        engine = Engine(loaded.model, loaded.tokenizer, LAYOUT, decoder=request.param, **options)
        engines.append(engine)
        return engine

    yield loaded, make
    for engine in engines:
        engine.close()


def reference_text(loaded, prompt: str, sentiment: str, max_tokens: int, settings) -> str:
    tokenizer, eos = loaded.tokenizer, loaded.tokenizer.token_id(LAYOUT.end_token)
    ids = tokenizer.encode(prompt)
    idx = torch.tensor([prompt_row(tokenizer, LAYOUT, sentiment, ids)])
    second = torch.tensor(guidance_rows(tokenizer, LAYOUT, [sentiment], ids, settings.guide_against))
    new = generate(loaded.model, idx, max_tokens, settings, eos_id=eos, sampler="reference",
                   guidance_idx=second)[0, idx.shape[1]:].tolist()
    return tokenizer.decode(new[:new.index(eos)] if eos in new else new)


def test_rows_joining_at_different_steps_draw_what_the_reference_loop_draws(served):
    """Greedy, so that each sample's tokens are its own whatever it shares a step with: prompts of different
    lengths join a running batch at different steps, decode each at its own position, give up their guidance
    rows after the third token, and run past the model's block (32) into the sliding window."""
    loaded, make = served
    engine = make(max_rows=16)
    cases = [("好看", "pos", 60, GREEDY_GUIDED), ("剧情拖沓，烂片", "neg", 45, GREEDY_GUIDED),
             ("好", "neg", 40, GREEDY_GUIDED.replace(no_repeat_ngram_size=2, repetition_penalty=1.3)),
             ("演技", "pos", 12, SamplingSettings.plain(temperature=0.0))]
    collected = []
    for number, (prompt, sentiment, max_tokens, settings) in enumerate(cases):
        steps = engine.stats["steps"]
        wait_until(lambda: engine.stats["steps"] >= steps + 2 * (number > 0), "the batch to take two steps")
        collected.append(Collected())
        engine.submit(Request([engine.encode(prompt)], collected[-1], max_tokens=max_tokens, settings=settings,
                              sentiment=sentiment))
    wait_until(lambda: all(c.ends() for c in collected), "every sample to end")
    for (prompt, sentiment, max_tokens, settings), got in zip(cases, collected):
        assert got.text() == reference_text(loaded, prompt, sentiment, max_tokens, settings), prompt
    assert max(len(c.text()) for c in collected) > 32  # one ran past the block


def test_a_request_joins_the_running_batch_at_the_next_step(served):
    loaded, make = served
    engine = make()
    plain = SamplingSettings.plain(temperature=0.0, candidates=1)
    long, short = Collected(), Collected()
    long_steps = []  # the engine's step count at each of the long sample's events
    engine.submit(Request([engine.encode("好看")], lambda e: (long_steps.append(engine.stats["steps"]), long(e)),
                          max_tokens=200, settings=plain, sentiment="pos"))
    wait_until(lambda: long.events, "the long sample's first text")
    steps_seen = []  # the engine's step count at each of the short sample's events
    joined_at = engine.stats["steps"]
    engine.submit(Request([engine.encode("难看")], lambda e: (steps_seen.append(engine.stats["steps"]), short(e)),
                          max_tokens=3, settings=plain, sentiment="neg"))
    wait_until(lambda: short.ends(), "the short sample to end")
    assert not long.ends(), "the short sample waited for the long one"
    # its first token at the step after it arrived (or the one after, if a step was in flight), then one a step
    assert steps_seen[0] - joined_at <= 2 and steps_seen[-1] - steps_seen[0] <= 2
    wait_until(lambda: long.ends(), "the long sample to end")
    # the long sample took a token at every step, the one where the short one joined among them
    assert long_steps == list(range(long_steps[0], long_steps[0] + len(long_steps)))
    assert long_steps[0] < steps_seen[0] < long_steps[-1]


def test_samples_leave_the_batch_at_once(served):
    loaded, make = served
    engine = make(start=False)
    rows, decoder = [], engine.batch.decoder  # the rows of each step's forward
    decode, prefill = decoder.decode, decoder.prefill
    decoder.decode = lambda tokens, *args: (rows.append(len(tokens)), decode(tokens, *args))[1]
    decoder.prefill = lambda first, prompts: (rows.append(len(prompts)), prefill(first, prompts))[1]
    unbanned = GREEDY_GUIDED.replace(guidance_tokens=0)  # every token guided: two rows a sample throughout
    got = {name: Collected() for name in ("gone", "short", "long")}
    requests = {name: Request([engine.encode("难看")], got[name], max_tokens=max_tokens, settings=unbanned,
                              sentiment="neg") for name, max_tokens in [("gone", 50), ("short", 3), ("long", 20)]}
    requests["gone"].sink = lambda e: (got["gone"](e), requests["gone"].cancel())  # leaves after its first text
    for request in requests.values():
        engine.submit(request)
    engine.start()
    wait_until(lambda: all(c.ends() for c in got.values()), "every sample to end")
    assert {name: c.ends() for name, c in got.items()} == {"gone": ["cancelled"], "short": ["length"],
                                                            "long": got["long"].ends()}
    assert len(got["long"].text()) > 10, "the case needs a sample that runs on after the others end"
    # the three samples' prefill (six rows), two decode steps of four rows (the short sample's second and third
    # tokens), then the long one's two rows alone
    assert rows[:3] == [6, 4, 4] and set(rows[3:]) == {2}


def test_a_full_queue_and_a_sample_too_big_for_the_batch_are_refused(served):
    loaded, make = served
    engine = make(max_rows=8, max_queue=2, start=False)
    plain = SamplingSettings.plain()
    engine.submit(Request([engine.encode("好")], Collected(), n=2, settings=plain))
    with pytest.raises(QueueFull):
        engine.submit(Request([engine.encode("好")], Collected(), settings=plain))
    with pytest.raises(ValueError, match="needs 16 rows"):  # 8 candidates, guided: 16 rows
        engine.submit(Request([engine.encode("好")], Collected(), settings=SamplingSettings(candidates=8)))


def test_candidates_keep_the_draw_with_the_largest_margin(served, monkeypatch):
    loaded, make = served
    engine = make()
    chosen = []
    best = RunningBatch._best

    def recording_best(choice, draws):
        index = best(choice, draws)
        chosen.append((choice, [list(d.tokens) for d in draws], [d.margin for d in draws], index, draws[index]))
        return index

    monkeypatch.setattr(RunningBatch, "_best", staticmethod(recording_best))
    got = Collected()
    settings = SamplingSettings(temperature=1.0, candidates=4)  # max_tokens past the block (32): counted within it
    engine.submit(Request([engine.encode("好看")], got, n=2, max_tokens=40, settings=settings, sentiment="neg",
                          seed=11))
    wait_until(lambda: len(got.ends()) == 2, "both samples to end")
    eos = loaded.tokenizer.token_id(LAYOUT.end_token)
    for choice, draws, summed, index, kept in chosen:  # summed as the draws decode, against scoring them again
        width = max(map(len, draws))
        drawn = torch.tensor([choice.prompt_ids + d + [eos] * (width - len(d)) for d in draws])
        margins = conditioning_margin(loaded.model, drawn, torch.tensor([choice.guidance_ids] * 4), eos)
        assert summed == pytest.approx(margins.tolist(), abs=1e-3) and index == int(torch.tensor(summed).argmax())
        assert got.text(choice.index) == loaded.tokenizer.decode([t for t in kept.tokens if t != eos][:40])
    assert len(chosen) == 2 and any(len({tuple(d) for d in draws}) > 1 for _, draws, _, _, _ in chosen)


def test_candidates_stream_from_the_step_their_margins_are_known(served):
    """Margins count the tokens in the first block: once every draw has passed it (or ended), the best one
    streams on alone, its siblings' rows gone, rather than after the slowest sibling's last token."""
    loaded, make = served
    engine = make(start=False)
    decode_rows, prefill_rows, decoder = [], [], engine.batch.decoder
    decode, prefill = decoder.decode, decoder.prefill
    decoder.decode = lambda tokens, *args: (decode_rows.append(len(tokens)), decode(tokens, *args))[1]
    decoder.prefill = lambda first, prompts: (prefill_rows.append(len(prompts)), prefill(first, prompts))[1]
    events = []  # (the decode steps so far, the event) of each event
    got = Collected()
    settings = SamplingSettings(temperature=1.0, candidates=3)
    engine.submit(Request([engine.encode("好看")], lambda e: (events.append((len(decode_rows), e)), got(e)),
                          max_tokens=60, settings=settings, sentiment="pos", seed=5))
    engine.start()
    wait_until(lambda: got.ends(), "the sample to end")
    assert got.ends() == ["length"], "the case needs a kept draw that runs past the block (32) to max_tokens"
    prompt_length = len(prompt_row(loaded.tokenizer, LAYOUT, "pos", loaded.tokenizer.encode("好看")))
    first_text_step = next(step for step, e in events if e.text)
    # the first text comes at the decode step where the draws pass the block (the prefill drew their first
    # token), with the kept draw's tokens up to there at once; then a token a step
    assert first_text_step == 32 - prompt_length - 1 and events[-1][0] == 59
    assert max(e.tokens for step, e in events if step == first_text_step) == first_text_step + 1
    assert set(decode_rows[first_text_step:]) == {1}  # the kept draw alone; second rows left at the block
    assert prefill_rows == [2] and decode_rows[0] == 6  # one prompt and its second prefilled, copied to 3 draws


def test_logprobs_are_the_models_own(served):
    loaded, make = served
    engine = make()
    got = Collected()
    settings = SamplingSettings.plain(temperature=1.0)
    engine.submit(Request([engine.encode("好看")], got, max_tokens=10, settings=settings, sentiment="pos", seed=2,
                          logprobs=3))
    wait_until(lambda: got.ends(), "the sample to end")
    entries, tokenizer = got.logprobs(), loaded.tokenizer
    assert "".join(text for _, text, _, _ in entries) == got.text() and len(entries) == 10
    row = prompt_row(tokenizer, LAYOUT, "pos", tokenizer.encode("好看")) + [token for token, _, _, _ in entries]
    with torch.no_grad():
        log_probs = loaded.model(torch.tensor([row]))[0][0].float().log_softmax(-1)
    start = len(row) - len(entries) - 1
    for i, (token, text, logprob, top) in enumerate(entries):
        assert text == tokenizer.decode([token])
        assert logprob == pytest.approx(float(log_probs[start + i, token]), abs=1e-4)
        expected_top = log_probs[start + i].topk(3)
        assert list(top.values()) == pytest.approx(expected_top.values.tolist(), abs=1e-4)
        assert list(top) == [tokenizer.decode([t]) for t in expected_top.indices.tolist()]


def test_a_seed_reproduces_its_samples_beside_other_traffic(served):
    loaded, make = served
    engine = make()
    settings = SamplingSettings(temperature=1.0, candidates=2)
    first, second, noise = Collected(), Collected(), Collected()
    engine.submit(Request([engine.encode("好看")], first, n=3, max_tokens=15, settings=settings, seed=5))
    wait_until(lambda: len(first.ends()) == 3, "the first request")
    engine.submit(Request([engine.encode("剧情拖沓")], noise, n=4, max_tokens=30, settings=settings))
    engine.submit(Request([engine.encode("好看")], second, n=3, max_tokens=15, settings=settings, seed=5))
    wait_until(lambda: len(second.ends()) == 3 and len(noise.ends()) == 4, "the other requests")
    assert [first.text(i) for i in range(3)] == [second.text(i) for i in range(3)]


def test_the_stop_matcher_finds_what_str_find_finds():
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 30)))
        ends = [text.find(s) + len(s) for s in stops if s in text]
        matcher = StopMatcher(stops)
        assert matcher.feed(text) == (min(ends) if ends else None), (stops, text)
        if not ends:  # what may still begin a stop string: the longest end of the text that starts one
            assert matcher.longest_partial() == max((k for s in stops for k in range(len(s)) if k and
                                                     text.endswith(s[:k])), default=0)


def test_a_long_stop_string_costs_time_linear_in_the_text(monkeypatch):
    """The issue's input: a stop string of 65,000 characters that the text keeps almost matching. Counting
    character comparisons, a sample of 256 characters costs a bounded multiple of 256 per stop string."""
    tokenizer = CharTokenizer.train(["ab"])
    compared = [0]

    class CountingStr(str):
        def __getitem__(self, k):
            compared[0] += 1
            return str.__getitem__(self, k)

    stream = TextStream(tokenizer, stops=(CountingStr("a" * 65000),), keep_stop=False)
    compared[0] = 0  # the stop string's own table, once per stream, is linear in its length
    sent = "".join(stream.feed(t) for t in tokenizer.encode("a" * 256))
    assert sent == "" and not stream.ended  # all of it may still become the stop string: held back
    assert compared[0] <= 4 * 256


def test_a_dead_worker_is_reported_and_nothing_waits_for_it(served, monkeypatch):
    loaded, make = served
    engine = make(start=False)

    def crash(self):
        raise SystemExit("injected crash")

    monkeypatch.setattr(RunningBatch, "step", crash)
    got = Collected()
    engine.submit(Request([engine.encode("好看")], got, n=2, max_tokens=5))
    engine.start()
    wait_until(lambda: len(got.ends()) == 2, "the running samples to end")
    assert {e.status for e in got.events if e.finish_reason} == {503}
    assert "injected crash" in got.events[-1].error
    health = engine.health()
    assert health["status"] == "down" and "SystemExit" in health["reason"]
    with pytest.raises(EngineStopped, match="worker stopped"):
        engine.submit(Request([engine.encode("好看")], Collected()))


def test_a_stuck_worker_fails_what_waits_and_recovers(served, monkeypatch):
    loaded, make = served
    engine = make(watchdog_s=0.5, max_rows=4)  # two candidates (with their second rows) fill the batch
    release, step = threading.Event(), RunningBatch.step

    def stuck_step(self):
        release.wait(30)
        return step(self)

    monkeypatch.setattr(RunningBatch, "step", stuck_step)
    plain = SamplingSettings.plain()
    running, waiting = Collected(), Collected()
    engine.submit(Request([engine.encode("好")], running, max_tokens=3, settings=plain.replace(candidates=2)))
    engine.submit(Request([engine.encode("好")], waiting, max_tokens=3, settings=plain))
    wait_until(lambda: waiting.ends(), "the waiting sample to fail", timeout=10)
    assert waiting.events[-1].status == 503 and "has not finished a step" in waiting.events[-1].error
    assert engine.health()["status"] == "down"
    release.set()
    wait_until(lambda: running.ends(), "the running sample to end once unstuck")
    assert running.ends() == ["length"] or running.ends() == ["stop"]
    wait_until(lambda: engine.health()["status"] == "ok", "the engine to count as well again")


def test_samples_of_one_and_of_several_candidates_share_a_step(served, monkeypatch):
    """Same settings but candidates: the candidates are still scored (and the single draw is not)."""
    loaded, make = served
    engine = make(start=False)
    margins = []
    best = RunningBatch._best
    monkeypatch.setattr(RunningBatch, "_best", staticmethod(lambda choice, draws: (
        margins.append((choice, [list(d.tokens) for d in draws], [d.margin for d in draws])), best(choice, draws))[1]))
    single, several = Collected(), Collected()
    settings = SamplingSettings(temperature=1.0)
    engine.submit(Request([engine.encode("好看")], single, max_tokens=10, settings=settings.replace(candidates=1),
                          sentiment="pos"))
    engine.submit(Request([engine.encode("好看")], several, max_tokens=10, settings=settings.replace(candidates=3),
                          sentiment="neg"))  # unseeded, both: one group unless candidates part them
    engine.start()
    wait_until(lambda: single.ends() and several.ends(), "both samples to end")
    assert single.ends()[0] in ("stop", "length") and several.ends()[0] in ("stop", "length")
    eos = loaded.tokenizer.token_id(LAYOUT.end_token)
    [(choice, draws, summed)] = margins
    width = max(map(len, draws))
    drawn = torch.tensor([choice.prompt_ids + d + [eos] * (width - len(d)) for d in draws])
    expected = conditioning_margin(loaded.model, drawn, torch.tensor([choice.guidance_ids] * 3), eos)
    assert summed == pytest.approx(expected.tolist(), abs=1e-3)
