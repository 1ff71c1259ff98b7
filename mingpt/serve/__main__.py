"""Serve a model over HTTP: `python -m mingpt.serve --ckpt out/demo [--host 127.0.0.1] [--port 8000]`.

An OpenAI-compatible `POST /v1/completions` (streaming with server-sent events), `GET /v1/models`,
`GET /health`, `GET /v1/model_card`, and a web playground at http://127.0.0.1:8000/. Requests are
queued and batched into one worker thread that owns the model (mingpt.serve.engine); needs
`pip install -e ".[serve]"`.
"""
import argparse
import os
import sys

from ..checkpoint import CheckpointError, load
from ..sample.engine import SAMPLERS
from ..sample.settings import add_flags, from_args
from ..train.records import read_record


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mingpt.serve", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="out",
                   help="checkpoint file, a directory holding ckpt.pt, or a Hugging Face GPT-2 directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--sampler", choices=SAMPLERS, default="auto", help="decode loop")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max_batch", type=int, default=32, help="most samples in one batch")
    p.add_argument("--max_queue", type=int, default=256, help="most samples waiting; beyond: 429 with Retry-After")
    p.add_argument("--max_tokens", type=int, default=256, help="cap on a request's max_tokens")
    p.add_argument("--default_max_tokens", type=int, default=100, help="max_tokens when a request gives none")
    p.add_argument("--max_n", type=int, default=8, help="cap on a request's n")
    p.add_argument("--max_candidates", type=int, default=16, help="cap on a request's candidates (each is a row)")
    p.add_argument("--max_prompt_chars", type=int, default=256, help="cap on a prompt's length")
    p.add_argument("--max_body_bytes", type=int, default=65536, help="cap on a request body (413 beyond)")
    p.add_argument("--log_level", default="warning", help="uvicorn's log level")
    add_flags(p.add_argument_group("sampling settings a request gets where it sets none"))
    return p


def build_server(args, start_engine=True):
    """(app, engine) for the parsed flags; the engine's worker is running unless start_engine is False."""
    from .api import Limits, create_app, model_card
    from .engine import Engine
    settings = from_args(args)
    loaded = load(args.ckpt, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = Engine(model, tokenizer, loaded.layout, sampler=args.sampler, max_batch=args.max_batch,
                    max_queue=args.max_queue, start=start_engine)
    folder = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(os.path.abspath(args.ckpt))
    name = os.path.basename(os.path.abspath(folder)) or "mingpt"
    limits = Limits(max_tokens=args.max_tokens, default_max_tokens=min(args.default_max_tokens, args.max_tokens),
                    max_n=args.max_n, max_candidates=args.max_candidates, max_prompt_chars=args.max_prompt_chars,
                    max_body_bytes=args.max_body_bytes)
    card = model_card(name, args.ckpt, model, tokenizer, loaded.data, read_record(folder), engine.sampler)
    return create_app(engine, name, card, limits, settings), engine


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from_args(args, parser)
    try:
        import uvicorn
        app, engine = build_server(args)
    except ImportError as e:
        print(f"serve: error: {e}; install the server with pip install -e \".[serve]\"", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    print(f"serve: {app.state.model_name} on http://{args.host}:{args.port}/ (sampler {engine.sampler})",
          file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
