"""One sample's text as its tokens arrive: whole characters only, ended at the end token or at the first
stop string. The sample CLI (mingpt.sample.reviews.write_samples) and the server (mingpt.serve.engine)
both stream through TextStream."""


class IncrementalDecoder:
    """One sample's text as its tokens arrive: `feed(id)` returns only whole characters, never half a
    UTF-8 sequence or half a BPE piece (a byte-level BPE token can end mid-character: its text is held
    back until the character completes); special tokens read as nothing."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pending = tokenizer, []  # the tokens of a character not yet complete

    def feed(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            return ""
        self.pending = []
        return text


def prefix_function(pattern: str) -> list:
    """Knuth-Morris-Pratt: for each prefix of pattern, the length of its longest proper border."""
    border = [0] * len(pattern)
    for i in range(1, len(pattern)):
        k = border[i - 1]
        while k and pattern[i] != pattern[k]:
            k = border[k - 1]
        border[i] = k + (pattern[i] == pattern[k])
    return border


class StopMatcher:
    """Stop strings found in a growing text in time linear in the text, whatever their lengths: for each,
    the length of its longest prefix that ends the text so far, advanced one character at a time (KMP)."""

    def __init__(self, stops):
        self.stops, self.borders, self.matched = list(stops), [prefix_function(s) for s in stops], [0] * len(stops)

    def feed(self, text: str):
        """Advance over text; the index in text just past the first stop string completed in it, or None."""
        for position, char in enumerate(text):
            for i, stop in enumerate(self.stops):
                k = self.matched[i]
                while k and (k == len(stop) or stop[k] != char):
                    k = self.borders[i][k - 1]
                self.matched[i] = k = k + (stop[k] == char)
                if k == len(stop):
                    return position + 1
        return None

    def longest_partial(self) -> int:
        """How many characters at the end of the text begin some stop string."""
        return max((k for k in self.matched), default=0)


class TextStream:
    """feed(token) returns the text that may be sent now; `ended` turns true at the end token or the first
    stop string. keep_stop: the text keeps the stop string (as Hugging Face's stop_strings do) or ends
    before it (as OpenAI's stop does; text that may still grow into a stop string is then held back
    until it cannot). A stop string is found once it ends after `prefix` (the prompt the text begins
    with, which counts as sent): the first one completed, character by character (StopMatcher, linear
    in the text whatever the stop strings' lengths)."""

    def __init__(self, tokenizer, eos_id=None, stops=(), keep_stop=True, prefix: str = ""):
        self.decoder, self.eos_id, self.stops, self.keep_stop = IncrementalDecoder(tokenizer), eos_id, stops, keep_stop
        self.text, self.sent, self.ended = prefix, len(prefix), False
        self.matcher = StopMatcher(stops)
        while (end := self.matcher.feed(prefix)) is not None:  # a stop string may begin in the prompt; it
            prefix = prefix[end:]                              # counts once it ends after it

    def take(self, end: int) -> str:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def first_stop(self, new: str):
        """(start, end) in the text of the first stop string completed in the new text, or None."""
        end = self.matcher.feed(new)
        if end is None:
            return None
        end += len(self.text) - len(new)
        length = next(len(s) for s, k in zip(self.stops, self.matcher.matched) if k == len(s))
        return end - length, end

    def held_back(self) -> int:
        """How many characters at the end of the text could still begin a stop string (never sent ones only)."""
        return min(self.matcher.longest_partial(), len(self.text) - self.sent)

    def feed(self, token: int) -> str:
        if self.ended:
            return ""
        if token == self.eos_id:
            self.ended = True
            return self.flush()
        new = self.decoder.feed(token)
        self.text += new
        hit = self.first_stop(new) if self.stops else None
        if hit is not None:
            self.ended = True
            return self.take(hit[1] if self.keep_stop else hit[0])
        return self.take(len(self.text) - (0 if self.keep_stop else self.held_back()))

    def flush(self) -> str:
        """What is held back (the sample ends without a stop string)."""
        return self.take(len(self.text))
