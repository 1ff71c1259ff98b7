"""Serving: the engine that batches requests through one worker thread (engine), the OpenAI-compatible
HTTP API (api) and the web playground (static/). `python -m mingpt.serve` is the command (__main__)."""
