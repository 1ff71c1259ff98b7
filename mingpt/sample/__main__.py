"""Write reviews: `python -m mingpt.sample --start 好看 --num_samples 10 --max_new_tokens 100`.

Samples print one per line. In the `review` layout each sample is <bos> <sentiment> start...
and stops at its end token; --sentiment auto lets the model draw the sentiment token itself.
--stream prints each sample character by character as it is written; --interactive reads
prompts in a loop (`:pos`, `:neg`, `:auto` switch the sentiment, `:temperature 0.5` or any other
sampling flag sets it for the next prompts, `:quit` or end of input stops).
"""
import argparse
import sys

from ..checkpoint import CheckpointError, load
from .engine import SAMPLERS, resolve_sampler
from .reviews import write_samples
from .settings import FIELDS, add_flags, from_args


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mingpt.sample", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="out",
                   help="checkpoint file, a directory holding ckpt.pt, or a Hugging Face GPT-2 directory (mingpt.export)")
    p.add_argument("--start", default="", help="text every sample starts with")
    p.add_argument("--sentiment", choices=("auto", "pos", "neg"), default="auto",
                   help="review layout: the sentiment token before --start; auto: the model samples it")
    p.add_argument("--num_samples", type=int, default=10, help="samples to write")
    p.add_argument("--max_new_tokens", type=int, default=100, help="most tokens per sample after the prompt")
    add_flags(p)
    p.add_argument("--prompts", metavar="FILE",
                   help="prompts, one a line (blank lines skipped), each optionally 'pos<TAB>', 'neg<TAB>' or "
                        "'auto<TAB>' first; instead of --start, --num_samples of each")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--sampler", choices=SAMPLERS, default="auto", help="decode loop")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--verbose", action="store_true", help="say which sampler ran and each sample's sentiment")
    p.add_argument("--stream", action="store_true", help="print each sample character by character as it is written")
    p.add_argument("--interactive", action="store_true",
                   help="read prompts from standard input in a loop, streaming each answer (see above)")
    return p


# The flags an --interactive line `:name value` may set between prompts: the sample's own and every setting.
INTERACTIVE_FLAGS = ("sentiment", "num_samples", "max_new_tokens", "seed", *FIELDS)


def one_line(text: str) -> str:
    """A sample's text for a line of its own: its line breaks written as \\n (a review may hold them)."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class StreamPrinter:
    """Prints the samples of one batch in order, each as it is written: the earliest unfinished sample
    live, the later ones buffered until those before them have ended (so the output is the same
    text as unstreamed)."""

    def __init__(self, num_samples: int, verbose: bool, out):
        self.pending, self.ended = [[] for _ in range(num_samples)], [False] * num_samples
        self.verbose, self.out, self.current = verbose, out, 0

    def write(self, text: str):
        self.out.write(text)
        self.out.flush()

    def on_text(self, row: int, piece, sentiment: str):
        if piece is None:
            self.ended[row] = True
        elif not self.pending[row] and self.verbose:
            self.pending[row].append(f"[{sentiment}] ")
        self.pending[row].append(one_line(piece or ""))
        while self.current < len(self.pending):
            self.write("".join(self.pending[self.current]))
            self.pending[self.current] = [""]  # printed; keeps the row marked as started
            if not self.ended[self.current]:
                break
            self.write("\n")
            self.current += 1

    def end(self):
        """Called once generation is done: the samples that ran out of tokens end here."""
        for row in range(self.current, len(self.pending)):
            self.on_text(row, None, None)


def read_prompts(path: str, tokenizer) -> list:
    """(start, sentiment) of each non-blank line of a prompts file; errors name the line."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            sentiment, tab, start = line.partition("\t")
            if not tab:
                sentiment, start = "auto", line
            if sentiment not in ("pos", "neg", "auto"):
                raise ValueError(f"{path} line {number}: the sentiment before the tab must be pos, neg or auto, "
                                 f"got {sentiment!r}")
            try:
                tokenizer.encode(start)
            except ValueError as e:
                raise ValueError(f"{path} line {number}: {e}") from None
            prompts.append((start, sentiment))
    return prompts


def write_and_print(model, tokenizer, layout, args, out=None):
    """Samples for args (write_samples' arguments), printed one per line, streamed with args.stream."""
    out = out or sys.stdout
    prompts = read_prompts(args.prompts, tokenizer) if args.prompts else [(args.start, args.sentiment)]
    settings = from_args(args)
    for start, sentiment in prompts:
        options = dict(seed=args.seed, sampler=args.sampler)
        if not args.stream:
            for drawn, text in write_samples(model, tokenizer, layout, start, sentiment, args.num_samples,
                                             args.max_new_tokens, settings, **options):
                out.write(f"[{drawn}] {one_line(text)}\n" if args.verbose else f"{one_line(text)}\n")
            continue
        printer = StreamPrinter(args.num_samples, args.verbose, out)
        write_samples(model, tokenizer, layout, start, sentiment, args.num_samples, args.max_new_tokens, settings,
                      on_text=printer.on_text, **options)
        printer.end()


def interactive(model, tokenizer, layout, args, parser, lines=None, out=None):
    """The prompt loop of --interactive: each line is a prompt, or a `:command`."""
    lines, out = lines or sys.stdin, out or sys.stdout
    args.stream, parser.exit_on_error = True, False  # a bad value is reported, and the loop goes on
    out.write(f"mingpt interactive: a prompt per line; :pos :neg :auto, :{' :'.join(INTERACTIVE_FLAGS[1:])} VALUE, :quit\n")
    out.write("> ")
    out.flush()
    for line in lines:
        line = line.rstrip("\n")
        command, _, value = line[1:].partition(" ") if line.startswith(":") else (None, "", "")
        try:
            if command in ("quit", "q", "exit"):
                break
            if command in ("pos", "neg", "auto"):
                args.sentiment = command
            elif command in INTERACTIVE_FLAGS:
                parser.parse_args([f"--{command}", value.strip()], namespace=args)
            elif command is not None:
                out.write(f"unknown command :{command}\n")
            else:
                args.start = line
                write_and_print(model, tokenizer, layout, args, out)
        except (ValueError, RuntimeError, argparse.ArgumentError) as e:
            out.write(f"error: {e}\n")
        out.write("> ")
        out.flush()


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompts and args.interactive:
        parser.error("--prompts and --interactive both say where prompts come from: give one")
    from_args(args, parser)
    try:
        loaded = load(args.ckpt, device=args.device)
        if args.verbose:
            print(f"sampler: {resolve_sampler(args.sampler, loaded.model)}, {args.weights} weights; "
                  f"ops: {loaded.model.ops.name}; checkpoint {args.ckpt}", file=sys.stderr)
        if args.interactive:
            interactive(loaded.model, loaded.tokenizer, loaded.layout, args, parser)
        else:
            write_and_print(loaded.model, loaded.tokenizer, loaded.layout, args)
    except (CheckpointError, ValueError, RuntimeError, OSError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
