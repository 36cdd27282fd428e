"""Command line: serve, or tokenize / encode / reconstruct files in-process or on a server.

    python -m service serve [--host 127.0.0.1] [--port 8000]
    python -m service tokenize photo.jpg [--tokens discrete] > tokens.json
    python -m service encode photo.jpg clip.mp4
    python -m service reconstruct long_clip.mp4 -o clip_rec.mp4           # a progress bar per file
    python -m service reconstruct clip.mp4 --server http://gpu-box:8000    # via the job API
    python -m service tokenize-dataset photos/ tokens/ --embeddings         # Parquet shards, resumable
    python -m service decode tokens/ cats/001.jpg -o check.png              # a row back to media
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from pydantic import ValidationError

from .errors import error_body


def _serve(args, settings) -> None:
    import uvicorn

    from .app import create_app

    # On SIGTERM, in-flight requests may run to their deadline before the worker is stopped
    # (the Helm chart's grace period leaves room for this).
    uvicorn.run(create_app(settings), host=args.host or settings.host, port=args.port or settings.port,
                log_level="info", access_log=settings.access_log,
                timeout_graceful_shutdown=int(settings.request_timeout_s) + 10)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atoken", description="AToken inference service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    for name in ("tokenize", "encode", "reconstruct"):
        p = sub.add_parser(name, help=f"{name} local files (in-process, or on --server)")
        p.add_argument("files", nargs="+")
        p.add_argument("--tokens", choices=["continuous", "discrete"], default="continuous")
        p.add_argument("--format", default=None, help="output format (png/jpeg/webp/mp4/webm/ply/npz)")
        p.add_argument("--fps", type=float, help="video: sample at this rate")
        p.add_argument("--max-frames", type=int, help="video: at most this many frames")
        p.add_argument("--start", type=float, help="video: from this time (s)")
        p.add_argument("--end", type=float, help="video: up to this time (s)")
        p.add_argument("-o", "--output", default=None, help="reconstruct: the output file (one input)")
        p.add_argument("--server", help="a running service's URL: submit to its job API and follow progress")
        p.add_argument("--api-key", help="for --server (or ATOKEN_API_KEY); sent as a header")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                       help="progress bars on stderr (default: when stderr is a terminal)")
    bulk = sub.add_parser("tokenize-dataset", help="tokenize a dataset into Parquet shards (resumable)")
    bulk.add_argument("src", help="a folder (recursive, .tar files expand), a list of paths, or a .tar shard")
    bulk.add_argument("out", help="output folder: part-*.parquet, manifest.json, errors.jsonl")
    bulk.add_argument("--tokens", choices=["continuous", "discrete"], default="continuous")
    bulk.add_argument("--embeddings", action="store_true", help="also store the global embedding")
    bulk.add_argument("--shard-rows", type=int, default=1000, help="inputs per shard")
    bulk.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="of latents")
    bulk.add_argument("--engine", choices=["local", "ray"], default="local", help="ray: Ray Data (RAY_ADDRESS)")
    bulk.add_argument("--threads", type=int, default=0, help="torch threads for the model (0: all cores)")
    bulk.add_argument("--batch-tokens", type=int, default=0,
                      help="token passes per model batch (0: ATOKEN_BULK_BATCH_TOKENS, 8192 by default)")
    for flag in ("fps", "start", "end"):
        bulk.add_argument(f"--{flag}", type=float)
    bulk.add_argument("--max-frames", type=int)
    bulk.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty())
    dec = sub.add_parser("decode", help="turn one row of a tokenized dataset back into media")
    dec.add_argument("out", help="the tokenize-dataset output folder")
    dec.add_argument("key", help="the row's key (its input path relative to SRC)")
    dec.add_argument("-o", "--output", help="file to write (default: <key's name>.rec.<ext>)")
    dec.add_argument("--format", default=None)
    return parser


def configuration_error(exc: ValidationError) -> str:
    """pydantic's report, one line a setting, named as it is set (ATOKEN_...), no traceback."""
    lines = []
    for e in exc.errors(include_url=False):
        message = e["msg"].removeprefix("Value error, ")
        if e["loc"]:  # one setting's value; otherwise a rule across settings, which names them
            message = f"ATOKEN_{'_'.join(str(part) for part in e['loc']).upper()}: {message} (got {e['input']!r})"
        lines.append("  " + message)
    return "configuration error:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .settings import Settings

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except ValidationError as exc:
        print(configuration_error(exc), file=sys.stderr)
        return 2
    if args.command == "serve":
        _serve(args, settings)
        return 0
    from .cli import RemoteError, decode_row, run_dataset, run_local, run_remote

    try:
        if args.command == "tokenize-dataset":
            return run_dataset(args, settings)
        if args.command == "decode":
            return decode_row(args, settings)
        return run_remote(args) if args.server else asyncio.run(run_local(args, settings))
    except RemoteError as exc:
        print(f"error ({exc.status}): {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001
        status, body, _ = error_body(exc)
        print(f"error ({status}): {body['error']['message']}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
