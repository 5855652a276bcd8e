"""`loraplex` command line."""
from __future__ import annotations

import argparse
import logging
import sys

from server.settings import ConfigError, load_settings


def _serve(args: argparse.Namespace) -> int:
    from server.serve import serve

    settings = load_settings(args.config, {"host": args.host, "port": args.port})
    return serve(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LLM inference server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the base model and its experts over an OpenAI-compatible API")
    serve.add_argument("--config", help="YAML settings file (see configs/)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
