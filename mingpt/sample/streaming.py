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


class TextStream:
    """feed(token) returns the text that may be sent now; `ended` turns true at the end token or the first
    stop string. keep_stop: the text keeps the stop string (as Hugging Face's stop_strings do) or ends
    before it (as OpenAI's stop does; text that may still grow into a stop string is then held back
    until it cannot). A stop string is found once it ends after `prefix` (the prompt the text begins
    with, which counts as sent); each token's search covers the new text and the longest stop string
    before it, so a sample's stream costs time linear in its length."""

    def __init__(self, tokenizer, eos_id=None, stops=(), keep_stop=True, prefix: str = ""):
        self.decoder, self.eos_id, self.stops, self.keep_stop = IncrementalDecoder(tokenizer), eos_id, stops, keep_stop
        self.text, self.sent, self.searched, self.ended = prefix, len(prefix), len(prefix), False

    def take(self, end: int) -> str:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def first_stop(self):
        """(start, end) of the earliest stop string that ends in the text not yet searched, or None."""
        hits = [(i, i + len(s)) for s in self.stops for i in [self.text.find(s, max(0, self.searched - len(s) + 1))]
                if i >= 0]
        self.searched = len(self.text)
        return min(hits, default=None)

    def held_back(self) -> int:
        """How many characters at the end of the text could still begin a stop string (never sent ones only)."""
        unsent = len(self.text) - self.sent
        return max((k for s in self.stops for k in range(min(len(s) - 1, unsent), 0, -1)
                    if self.text.endswith(s[:k])), default=0)

    def feed(self, token: int) -> str:
        if self.ended:
            return ""
        if token == self.eos_id:
            self.ended = True
            return self.flush()
        self.text += self.decoder.feed(token)
        hit = self.first_stop() if self.stops else None
        if hit is not None:
            self.ended = True
            return self.take(hit[1] if self.keep_stop else hit[0])
        return self.take(len(self.text) - (0 if self.keep_stop else self.held_back()))

    def flush(self) -> str:
        """What is held back (the sample ends without a stop string)."""
        return self.take(len(self.text))
