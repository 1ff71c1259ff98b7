"""Serve a model over HTTP: `python -m mingpt.serve --ckpt out/demo [--host 127.0.0.1] [--port 8000]`.

An OpenAI-compatible `POST /v1/completions` (streaming with server-sent events, logprobs), `GET /v1/models`,
`POST /tokenize`, `POST /detokenize`, `GET /health`, `GET /metrics` (Prometheus), `GET /v1/model_card`, and
a web playground at http://127.0.0.1:8000/. Requests join a running batch that one worker thread decodes
(continuous batching, mingpt.serve.engine). Listening beyond loopback needs an API key (--api_key,
--api_key_file or MINGPT_API_KEY) or --insecure. Needs `pip install -e ".[serve]"`.
"""
import argparse
import os
import sys

from ..checkpoint import CheckpointError, load
from ..sample.settings import add_flags, from_args
from ..train.records import read_record
from .rows import DECODERS


def build_parser():
    p = argparse.ArgumentParser(prog="python -m mingpt.serve", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="out",
                   help="checkpoint file, a directory holding ckpt.pt, or a Hugging Face GPT-2 directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max_rows", type=int, default=128,
                   help="most rows decoded at once (a sample takes `candidates` rows, twice while guided)")
    p.add_argument("--decoder", choices=DECODERS, default="auto",
                   help="the running batch's forward: compiled (mingpt._C, CPU, fp32 weights), model (the model's own "
                        "KV-cached forward, any device) or auto (compiled where it runs)")
    p.add_argument("--max_queue", type=int, default=256, help="most samples waiting; beyond: 429 with Retry-After")
    p.add_argument("--max_tokens", type=int, default=256, help="cap on a request's max_tokens")
    p.add_argument("--default_max_tokens", type=int, default=100, help="max_tokens when a request gives none")
    p.add_argument("--max_n", type=int, default=8, help="cap on a request's n")
    p.add_argument("--max_candidates", type=int, default=16, help="cap on a request's candidates (each is a row)")
    p.add_argument("--max_prompt_chars", type=int, default=256, help="cap on a prompt's length")
    p.add_argument("--max_body_bytes", type=int, default=65536, help="cap on a request body (413 beyond)")
    p.add_argument("--body_timeout", type=float, default=10.0, help="seconds a request body may take (408 beyond)")
    p.add_argument("--max_connections", type=int, default=256, help="concurrent connections (503 beyond)")
    p.add_argument("--keep_alive", type=int, default=5, help="seconds an idle connection is kept")
    p.add_argument("--watchdog", type=float, default=30.0,
                   help="seconds without a finished decode step before the engine counts as stuck (503s)")
    p.add_argument("--api_key", action="append", default=[], metavar="KEY",
                   help="a key every request but /health must send as Authorization: Bearer KEY (repeatable; "
                        "also MINGPT_API_KEY)")
    p.add_argument("--api_key_file", default=None, help="a file of keys, one a line")
    p.add_argument("--insecure", action="store_true", help="allow listening beyond loopback without a key")
    p.add_argument("--allowed_hosts", default=None,
                   help="comma-separated Host names to answer (default: loopback names when --host is loopback, "
                        "else any)")
    p.add_argument("--cors_origins", default="", help="comma-separated origins whose pages may call the API")
    p.add_argument("--log_level", default="warning", help="uvicorn's log level")
    add_flags(p.add_argument_group("sampling settings a request gets where it sets none"))
    return p


def access_of(args):
    """The Host names, keys and origins of the flags; ValueError naming --api_key if the server would listen
    beyond loopback without a key (and without --insecure)."""
    from .access import LOOPBACK_NAMES, Access, is_loopback, read_keys
    keys = read_keys(args.api_key + [os.environ.get("MINGPT_API_KEY", "")], args.api_key_file)
    if not keys and not is_loopback(args.host) and not args.insecure:
        raise ValueError(f"listening on {args.host} opens the model to the network: give a key (--api_key, "
                         f"--api_key_file or MINGPT_API_KEY), or --insecure to go without one")
    hosts = args.allowed_hosts.split(",") if args.allowed_hosts else (LOOPBACK_NAMES if is_loopback(args.host) else None)
    return Access(api_keys=keys, allowed_hosts=None if hosts is None else tuple(h.strip().lower() for h in hosts),
                  cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()))


def build_server(args, start_engine=True):
    """(app, engine) for the parsed flags; the engine's worker is running unless start_engine is False."""
    from .api import Limits, create_app
    from .card import model_card
    from .engine import Engine
    settings = from_args(args)
    access = access_of(args)
    loaded = load(args.ckpt, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = Engine(model, tokenizer, loaded.layout, max_rows=args.max_rows, max_queue=args.max_queue,
                    watchdog_s=args.watchdog, start=start_engine, decoder=args.decoder)
    folder = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(os.path.abspath(args.ckpt))
    name = os.path.basename(os.path.abspath(folder)) or "mingpt"
    limits = Limits(max_tokens=args.max_tokens, default_max_tokens=min(args.default_max_tokens, args.max_tokens),
                    max_n=args.max_n, max_candidates=args.max_candidates, max_prompt_chars=args.max_prompt_chars,
                    max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout)
    card = model_card(name, args.ckpt, model, tokenizer, loaded.data, read_record(folder), engine.batch.decoder.name)
    return create_app(engine, name, card, limits, settings, access), engine


def uvicorn_config(app, args):
    import uvicorn
    return uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                          limit_concurrency=args.max_connections, timeout_keep_alive=args.keep_alive)


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
    except (CheckpointError, ValueError, RuntimeError, OSError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    print(f"serve: {app.state.model_name} on http://{args.host}:{args.port}/ (at most {engine.max_rows} rows a "
          f"step, {engine.batch.decoder.name} decoder)", file=sys.stderr)
    try:
        uvicorn.Server(uvicorn_config(app, args)).run()
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
