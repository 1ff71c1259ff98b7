"""The server's running batch (continuous batching): rows join and leave between decode steps.

Each sample (a Choice of mingpt.serve.engine) runs as `candidates` draws; a guided draw, or a candidate,
holds a second row under the second conditioning until its last guided token (guidance_tokens, when
guidance_after is 1) or, a candidate, until its tokens pass the first block, then gives it up. The rows
live in one KV cache of `max_rows` sequences (mingpt.serve.rows: the compiled sampler's on the CPU), the
running ones packed at its front.
A step:
  1. the running rows decode their last token, each at its own position, and rows that joined since the
     last step are prefilled (by prompt length, each group in one forward; a sample's candidates share
     their prompts: one is prefilled, its caches copied), so that a new request draws its first token at
     the next step and no running row waits a step for it;
  2. each group of draws with equal settings (and, for a seeded request, its own generator) goes through
     the logit controls and the draw of mingpt.sample, each row at its own step;
  3. finished rows (end token, max_tokens, a stop string, a client gone) leave, the last rows moving into
     their places.
Past the model's block a row re-reads its last block of tokens at each step, as every sampler does.
A draw of a sample with candidates > 1 is kept to itself until its margin is known for every sibling:
the conditioning margin (mingpt.sample.candidates' rule) counts the tokens in the model's first block, and is
summed as the draws decode (their second rows run while their tokens lie in that block). Once each draw has
ended or passed the block, the one with the largest margin is kept and replayed into the sample's stream,
its siblings leave the batch, and it streams on like a single draw: what is kept is what scoring the finished
draws keeps, and neither the first character nor the rows wait for the siblings' tails.
"""
import collections
import itertools

import torch

from ..sample.controls import apply_row_controls
from ..sample.engine import pick_next
from .rows import running_rows


class Draw:
    """One drawn continuation of a choice, and its rows in the running batch."""

    def __init__(self, choice):
        self.choice, self.tokens, self.logprobs = choice, [], []
        self.history = list(choice.prompt_ids)  # the prompt row and the new tokens
        self.row, self.second_row, self.ended = None, None, False
        self.streams = choice.request.settings.candidates == 1  # its tokens go to the choice as they come
        self.margin = 0.0  # a candidate's conditioning margin so far (mingpt.sample.candidates)

    def add(self, token: int):
        self.tokens.append(token)
        self.history.append(token)

    def row_history(self, second: bool) -> list:
        return self.choice.guidance_ids + self.tokens if second else self.history


class RunningBatch:
    def __init__(self, model, tokenizer, eos_id: int, max_rows: int, decoder: str = "auto"):
        self.model, self.tokenizer, self.eos_id, self.max_rows = model, tokenizer, eos_id, max_rows
        self.decoder = running_rows(model, max_rows, decoder)
        self.owners = []  # row -> (draw, whether it is the draw's second-conditioning row)
        self.joined = []  # draws whose rows wait for their prefill
        self.draws = collections.defaultdict(list)  # choice -> its draws

    @property
    def rows(self) -> int:
        return len(self.owners)

    @property
    def rows_in_use(self) -> int:
        """The running rows and those the joined draws will take."""
        return self.rows + sum(rows_per_draw(draw.choice.request.settings) for draw in self.joined)

    @property
    def choices(self) -> list:
        return list(self.draws)

    @staticmethod
    def rows_needed(choice) -> int:
        settings = choice.request.settings
        return settings.candidates * rows_per_draw(settings)

    def admit(self, choice):
        """Give a choice (its prompt rows built) its rows; it draws its first token at the next step."""
        request = choice.request
        request.batch_key = (request.settings.replace(stop=()), request if request.seed is not None else None)
        for _ in range(request.settings.candidates):
            draw = Draw(choice)
            self.draws[choice].append(draw)
            self.joined.append(draw)

    def step(self):
        """One step: the running rows decode a token each, and the draws that joined since the last step are
        prefilled and draw their first."""
        self._drop_cancelled()
        if not self.draws:
            return
        drawing = [draw for draws in self.draws.values() for draw in draws]
        logits = [self._decode()] if self.rows else []
        if self.joined:
            logits.append(self._prefill())
        logits = torch.cat(logits)
        for key, draws in self._groups(drawing).items():
            self._draw_tokens(draws, logits, key[1])
        for choice in list(self.draws):
            self._settle(choice)
        self._compact()

    def fail_all(self, error: str, status: int):
        for choice in list(self.draws):
            choice.emit(finish_reason="error", error=error, status=status)
        self.draws.clear()
        self.owners, self.joined = [], []

    def _drop_cancelled(self):
        for choice in list(self.draws):
            if choice.request.cancelled.is_set():
                choice.emit(finish_reason="cancelled")
                self._leave(choice)
        self._compact()

    def _decode(self) -> torch.Tensor:
        """Next-token logits of every running row, by row: each decodes its last token at its own position, or,
        past the block, re-reads its last block of tokens (the samplers' context policy)."""
        block = self.model.config.block_size
        # a second row holds the same new tokens after a prompt of the same length: its last token and position
        last = [draw.history[-1] for draw, _ in self.owners]
        positions = [min(len(draw.history), block) - 1 for draw, _ in self.owners]
        windows = {row: draw.row_history(second)[-block:] for row, (draw, second) in enumerate(self.owners)
                   if len(draw.history) > block}
        return self.decoder.decode(last, positions, windows)

    def _prefill(self):
        """The joined draws take rows at the end. A choice's draws share their prompts: one of them is prefilled
        (a forward for each prompt length) and its caches are copied to the others'. Returns (next-token logits
        of the new rows, by row)."""
        first_row, parts = self.rows, []
        leaders = {}
        for draw in self.joined:
            leaders.setdefault(draw.choice, draw)
        by_length = sorted(leaders.values(), key=lambda draw: len(draw.choice.prompt_ids))
        for _, same_length in itertools.groupby(by_length, lambda draw: len(draw.choice.prompt_ids)):
            draws = list(same_length)
            seconds = [draw for draw in draws if draw.choice.request.settings.needs_guidance_idx]
            prompts = [draw.choice.prompt_ids for draw in draws] + [draw.choice.guidance_ids for draw in seconds]
            first = self.rows
            for draw in draws:
                draw.row = self._own(draw, False)
            for draw in seconds:
                draw.second_row = self._own(draw, True)
            parts.append(self.decoder.prefill(first, prompts))
        sources = []
        for draw in self.joined:
            leader = leaders[draw.choice]
            if draw is not leader:
                draw.row = self._own(draw, False)
                sources.append(leader.row)
                if leader.second_row is not None:
                    draw.second_row = self._own(draw, True)
                    sources.append(leader.second_row)
        logits = torch.cat(parts)
        if sources:
            self.decoder.move(sources, list(range(first_row + len(logits), self.rows)))
        self.joined = []
        return logits[list(range(len(logits))) + [source - first_row for source in sources]]

    def _own(self, draw, second: bool) -> int:
        self.owners.append((draw, second))
        return len(self.owners) - 1

    @staticmethod
    def _groups(draws) -> dict:
        """The draws that run, by (settings without stop strings, seeded request or None): each group shares
        its controls, its draw and whether its draws are candidates to score."""
        groups = collections.defaultdict(list)
        for draw in draws:
            if not draw.ended:
                groups[draw.choice.request.batch_key].append(draw)
        return groups

    def _draw_tokens(self, draws: list, logits: torch.Tensor, seeded_request):
        """Each draw's next token from the logits of its rows."""
        settings = draws[0].choice.request.settings
        first = logits[[draw.row for draw in draws]]
        second = None
        if settings.guided:  # a draw that gave up its second row is guided by 1: its own log-probabilities
            second = logits[[draw.row if draw.second_row is None else draw.second_row for draw in draws]]
        steps = [len(draw.tokens) for draw in draws]
        controlled = apply_row_controls(first, second, [draw.history for draw in draws], settings, steps)
        generator = seeded_request.generator if seeded_request is not None else None
        picked = pick_next(controlled, settings, generator).squeeze(1).tolist()
        wanted = [i for i, draw in enumerate(draws) if draw.choice.request.logprobs is not None]
        if wanted:
            self._record_logprobs([draws[i] for i in wanted], first[wanted], [picked[i] for i in wanted])
        if settings.candidates > 1:
            self._add_margins(draws, logits, picked)
        block = self.model.config.block_size
        for draw, token in zip(draws, picked):
            draw.add(token)
            choice = draw.choice
            if draw.streams:
                choice.step(token, draw.logprobs[-1] if draw.logprobs else None)
            draw.ended = token == self.eos_id or len(draw.tokens) >= choice.request.max_tokens or choice.done
            if draw.ended:  # its rows leave now; a candidate's tokens wait for its siblings
                self._release_rows(draw)
            elif draw.second_row is not None and not needs_second_row(draw, settings, block):
                self._release(draw.second_row)
                draw.second_row = None

    def _add_margins(self, draws, logits, picked):
        """Each candidate's new token's log-probability under its prompt minus under the second one, counted
        while the token lies in the model's first block (conditioning_margin's rule): the second rows of
        candidates run until then, so no draw is scored again at its end."""
        counted = [i for i, draw in enumerate(draws) if not self._scored(draw)]
        if not counted:
            return
        rows = [draws[i].row for i in counted] + [draws[i].second_row for i in counted]
        tokens = torch.tensor([picked[i] for i in counted] * 2, device=logits.device)
        log_probs = logits[rows].float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        asked, second = log_probs.chunk(2)
        for i, margin in zip(counted, (asked - second).tolist()):
            draws[i].margin += margin

    def _record_logprobs(self, draws, logits, picked):
        log_probs = logits.float().log_softmax(-1)
        top = log_probs.topk(max(draw.choice.request.logprobs for draw in draws), -1)
        chosen = log_probs.gather(1, torch.tensor(picked, device=logits.device)[:, None]).squeeze(1).tolist()
        for r, (draw, token) in enumerate(zip(draws, picked)):
            n = draw.choice.request.logprobs
            alternatives = {self.tokenizer.decode([i]): lp for i, lp in zip(top.indices[r, :n].tolist(),
                                                                            top.values[r, :n].tolist())}
            draw.logprobs.append((token, self.tokenizer.decode([token]), chosen[r], alternatives))

    def _settle(self, choice):
        """Keep the best of a choice's candidates once their margins are known, and end a choice whose draws have
        all ended."""
        draws = self.draws[choice]
        if not draws[0].streams and all(draw.ended or self._scored(draw) for draw in draws):
            kept = draws[self._best(choice, draws)]
            for draw in draws:
                if draw is not kept:
                    draw.ended = True
                    self._release_rows(draw)
            self.draws[choice] = draws = [kept]
            kept.streams = True
            for token, logprob in zip(kept.tokens, kept.logprobs or [None] * len(kept.tokens)):
                if choice.done:
                    break
                choice.step(token, logprob)
        if not choice.done and not all(draw.ended for draw in draws):
            return
        if not choice.done:
            choice.finish()
        self._leave(choice)

    def _scored(self, draw) -> bool:
        """Whether a candidate's margin is final: its tokens have passed the model's first block."""
        return len(draw.history) >= self.model.config.block_size

    @staticmethod
    def _best(choice, draws) -> int:
        """The candidate with the largest margin (the first of equals, as best_rows)."""
        return max(range(len(draws)), key=lambda i: draws[i].margin)

    def _leave(self, choice):
        for draw in self.draws.pop(choice):
            draw.ended = True
            self._release_rows(draw)
        self.joined = [draw for draw in self.joined if draw.choice is not choice]

    def _release_rows(self, draw):
        for row in (draw.row, draw.second_row):
            if row is not None:
                self._release(row)
        draw.row = draw.second_row = None

    def _release(self, row: int):
        self.owners[row] = None

    def _compact(self):
        """Move the last running rows into the places of those that left, so that the running rows are
        the cache's first ones again."""
        kept = sum(owner is not None for owner in self.owners)
        holes = [row for row in range(kept) if self.owners[row] is None]
        tail = [row for row in range(kept, len(self.owners)) if self.owners[row] is not None]
        if holes:
            self.decoder.move(tail, holes)
            for source, target in zip(tail, holes):
                draw, second = self.owners[target] = self.owners[source]
                setattr(draw, "second_row" if second else "row", target)
        del self.owners[kept:]


def rows_per_draw(settings) -> int:
    """A draw's rows: its own, and one under the second conditioning when guided or one of several candidates."""
    return 2 if settings.needs_guidance_idx else 1


def needs_second_row(draw, settings, block: int) -> bool:
    """Whether a draw's next token still reads its second row: to be guided, or to score it as a candidate."""
    guiding = settings.guided and not (settings.guidance_after == 1.0 and settings.guidance_tokens
                                       and len(draw.tokens) >= settings.guidance_tokens)
    return guiding or (settings.candidates > 1 and len(draw.history) < block)
