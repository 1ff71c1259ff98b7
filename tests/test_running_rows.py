"""The running batch's KV caches (mingpt.serve.rows): the compiled sampler's RunningRows and the model's own
cached forward, each against the no-cache forward, for sequences that join, decode at their own positions,
re-read a window and move, with GPT-2's architecture and with each option after it, and the compiled one's
refusals of bad calls."""
import pytest
import torch

from mingpt.sample import compiled
from mingpt.serve.rows import CompiledRows, ModelRows, running_rows
from test_model_options import OPTION_IDS, OPTIONS
from test_sampler import CONFIGS, spread_model, spread_options_model

requires_cached = pytest.mark.skipif(compiled.cached_sampler_unavailable_reason() is not None,
                                     reason=f"{compiled.cached_sampler_unavailable_reason()}")
BACKENDS = [pytest.param(CompiledRows, marks=requires_cached), ModelRows]


def last_logits(model, sequence: list) -> torch.Tensor:
    """The no-cache forward's logits after a sequence (its last block)."""
    with torch.no_grad():
        return model(torch.tensor([sequence[-model.config.block_size:]]))[0][0, -1]


def check_rows_join_decode_slide_and_move(model, backend):
    block, vocab = model.config.block_size, model.config.vocab_size
    generator = torch.Generator().manual_seed(3)
    rows = backend(model, 5)
    sequences = {}  # row -> its tokens so far

    def check(logits, rows_checked):
        for logit_row, row in zip(logits, rows_checked):  # fp32, another summation order: ~1e-6 of ~10
            torch.testing.assert_close(logit_row, last_logits(model, sequences[row]), rtol=0, atol=1e-4)

    def prefill(first, length, count):
        prompts = torch.randint(vocab, (count, length), generator=generator).tolist()
        for i, prompt in enumerate(prompts):
            sequences[first + i] = prompt
        with torch.no_grad():
            check(rows.prefill(first, prompts), range(first, first + count))

    def decode():
        running = sorted(sequences)
        tokens = torch.randint(vocab, (len(running),), generator=generator).tolist()
        for row, token in zip(running, tokens):
            sequences[row].append(token)
        positions = [min(len(sequences[row]), block) - 1 for row in running]
        windows = {row: sequences[row][-block:] for row in running if len(sequences[row]) > block}
        with torch.no_grad():
            check(rows.decode(tokens, positions, windows), running)

    prefill(0, 4, 2)
    decode()
    prefill(2, 1, 1)  # joins two steps after the first ones
    for _ in range(3):
        decode()
    prefill(3, block, 1)  # a prompt of a whole block: its next token slides the window
    for _ in range(block - 6):  # rows 0, 1 and 3 pass the block, 2 does not yet
        decode()
    assert len(sequences[0]) > block and len(sequences[3]) > block and len(sequences[2]) < block
    rows.move([3, 2], [0, 1])  # compaction: rows 0 and 1 leave, 2 and 3 take their places
    sequences = {0: sequences[3], 1: sequences[2]}
    for _ in range(4):  # the moved row 2 passes the block here
        decode()
    assert len(sequences[1]) > block


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_join_decode_slide_and_move_give_the_forwards_logits(name, backend):
    check_rows_join_decode_slide_and_move(spread_model(name), backend)


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_of_each_architecture_option_give_the_forwards_logits(options, backend):
    check_rows_join_decode_slide_and_move(spread_options_model(options), backend)


def running_rows_logits(rows, model):
    """(got, expected): the logits of RunningRows.forward itself (the server reads windows through the model
    instead) and the no-cache forward's of what each sequence then holds, for sequences that join at different
    steps, continue by one token or several at their own positions, re-read a window from position 0, and move
    onto a sequence that held other tokens."""
    block, vocab = model.config.block_size, model.config.vocab_size
    generator = torch.Generator().manual_seed(4)
    held = {}  # sequence -> its tokens by position
    got, expected = [], []

    def forward(continuations):  # {sequence: (start, new tokens)}
        sequences = list(continuations)
        starts = [continuations[s][0] for s in sequences]
        tokens = [torch.randint(vocab, (continuations[s][1],), generator=generator).tolist() for s in sequences]
        for s, start, new in zip(sequences, starts, tokens):
            held[s] = held.get(s, [])[:start] + new
        got.append(rows.forward(sequences, starts, tokens))
        expected.append(torch.stack([last_logits(model, held[s]) for s in sequences]))

    forward({0: (0, 5), 2: (0, 1)})
    forward({0: (5, 1), 2: (1, 3), 3: (0, block)})  # a decode, three tokens on, a whole block joining
    for _ in range(block - 8):
        forward({s: (len(held[s]), 1) for s in (0, 2)})
    forward({3: (0, block), 2: (len(held[2]), 2)})  # 3 re-reads a window from 0
    rows.move([0, 2], [3, 1])
    held[3], held[1] = held[0], held[2]
    forward({3: (len(held[3]), 2), 1: (len(held[1]), 1), 2: (len(held[2]), 1)})  # keys and tokens moved along
    assert len(held[3]) == block
    return torch.cat(got), torch.cat(expected)


@requires_cached
@pytest.mark.parametrize("options", [{}] + OPTIONS, ids=["gpt2"] + OPTION_IDS)
def test_running_rows_forward_gives_the_forwards_logits(options):
    model = spread_options_model(options)
    got, expected = running_rows_logits(compiled.packed_sampler(model).running_rows(5, 2), model)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)  # fp32, another summation order


@requires_cached
def test_compiled_rows_refuse_bad_calls_by_name():
    model = spread_model("odd")
    rows = compiled.packed_sampler(model).running_rows(3, 1)
    block, vocab = model.config.block_size, model.config.vocab_size
    cases = [
        (([0, 0], [0, 0], [[1], [2]]), "distinct"),
        (([3], [0], [[1]]), r"in \[0, 3\)"),
        (([0], [block - 1], [[1, 2]]), "within the block"),
        (([0], [0], [[]]), "at least one"),
        (([0], [-1], [[1]]), "position -1"),
        (([0], [0], [[vocab]]), f"token id {vocab}"),
        (([0, 1], [0], [[1], [2]]), "one equal length"),
        (([], [], []), "one equal length"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            rows.forward(*args)
    with pytest.raises(ValueError, match="not a source"):
        rows.move([0, 1], [1, 2])
    with pytest.raises(ValueError, match="source 5"):
        rows.move([5], [0])
    with pytest.raises(ValueError, match="sequences must be in"):
        compiled.packed_sampler(model).running_rows(0)


def test_the_decoder_is_chosen_by_where_it_runs():
    model = spread_model("odd")
    assert isinstance(running_rows(model, 2, "model"), ModelRows)
    expected = CompiledRows if compiled.cached_sampler_unavailable_reason(model) is None else ModelRows
    assert isinstance(running_rows(model, 2), expected)
    with pytest.raises(ValueError, match="unknown decoder 'fast'"):
        running_rows(model, 2, "fast")
    with pytest.raises(ValueError, match="compiled decoder cannot run: .*bfloat16"):
        running_rows(model.to(torch.bfloat16), 2, "compiled")
