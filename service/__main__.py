"""Command line: serve, or tokenize / encode / reconstruct files without HTTP.

    python -m service serve [--host 127.0.0.1] [--port 8000]
    python -m service tokenize photo.jpg [--tokens discrete] > tokens.json
    python -m service encode photo.jpg clip.mp4
    python -m service reconstruct photo.jpg -o photo_rec.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import error_body


def _serve(args, settings) -> None:
    import uvicorn

    from .app import create_app

    # On SIGTERM, in-flight requests may run to their deadline before the worker is stopped
    # (the Helm chart's grace period leaves room for this).
    uvicorn.run(create_app(settings), host=args.host or settings.host, port=args.port or settings.port,
                log_level="info", access_log=settings.access_log,
                timeout_graceful_shutdown=int(settings.request_timeout_s) + 10)


def _offline(args, settings) -> int:
    """Run one operation in-process on local files (the same pipeline the HTTP API uses)."""
    from .outputs import choose_format, render
    from .pipeline import Options, preprocess, round_trip_psnr, tokens_to_json
    from .worker.backends import LocalBackend
    from .worker.jobs import Job

    backend = LocalBackend(settings.model_spec)
    info = backend.start()
    options = Options(tokens=args.tokens, format=args.format)
    items = [preprocess(Path(f).read_bytes(), options, settings.limits) for f in args.files]
    op = {"encode": "embed", "tokenize": "tokenize", "reconstruct": "reconstruct"}[args.command]
    jobs = [Job(i, op, mode=args.tokens, batch=item.batch, gaussians=bool(info.get("gaussians")))
            for i, item in enumerate(items)]
    results = backend.run(jobs)
    for r in results:
        if r.error:
            print(f"error: {r.error[1]}", file=sys.stderr)
            return 1
    if args.command == "encode":
        print(json.dumps({"items": [{"file": f, "embedding": r.embedding.tolist()}
                                    for f, r in zip(args.files, results)]}))
    elif args.command == "tokenize":
        model = info.get("modes", {}).get(args.tokens, info)  # tokens=discrete may come from a second model
        print(json.dumps({"model": {"variant": model.get("variant"), "sha256": model.get("sha256")},
                          "mode": args.tokens, "items": [tokens_to_json(i, item, r.tokens, "base64")
                                    for i, (item, r) in enumerate(zip(items, results))]}))
    else:
        for f, item, r in zip(args.files, items, results):
            fmt = choose_format(item.kind, args.format, r.gaussians is not None)
            out = Path(args.output) if args.output and len(args.files) == 1 else Path(f).with_suffix(f".rec.{fmt}")
            out.write_bytes(render(item.kind, r.tubelets, item.batch.coords, item.media, r.gaussians, fmt))
            score = round_trip_psnr(item, r)
            print(f"{f} -> {out}" + (f" (PSNR {score:.2f} dB)" if score is not None else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .settings import Settings

    parser = argparse.ArgumentParser(prog="atoken", description="AToken inference service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    for name in ("tokenize", "encode", "reconstruct"):
        p = sub.add_parser(name, help=f"{name} local files in-process")
        p.add_argument("files", nargs="+")
        p.add_argument("--tokens", choices=["continuous", "discrete"], default="continuous")
        p.add_argument("--format", default=None, help="output format (png/jpeg/webp/mp4/webm/ply/npz)")
        p.add_argument("-o", "--output", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    if args.command == "serve":
        _serve(args, settings)
        return 0
    try:
        return _offline(args, settings)
    except Exception as exc:  # noqa: BLE001
        status, body, _ = error_body(exc)
        print(f"error ({status}): {body['error']['message']}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
