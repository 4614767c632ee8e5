"""The `baton` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from server.config import ModelSpec, Settings, default_home
from server.errors import BatonError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BatonError as error:
        print(f"baton: error: {error.message}", file=sys.stderr)
        return 1
    except ValidationError as error:
        print(f"baton: invalid configuration:\n{error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Serve open-weight models behind an OpenAI-compatible API.")
    parser.add_argument("--home", type=Path, default=None, help=f"baton's data folder (default: $BATON_HOME or {default_home()})")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve a model (the bundled demo model when --model is not given)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", type=Path, help="a local Hugging Face model folder")
    serve.add_argument("--name", help="the name clients send as `model` (default: the folder's name)")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--max-batch-size", type=int, default=16, help="generations decoded together")
    serve.add_argument("--max-model-len", type=int, default=None, help="cap the context length")
    serve.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt weights (they can run code)")
    serve.add_argument("--api-key", default=os.environ.get("BATON_API_KEY"), help="require this bearer key on /v1 (default: $BATON_API_KEY)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="prepare the bundled demo model and print its folder")
    demo.set_defaults(run=_demo)
    return parser


def _home(args) -> Path:
    return args.home or Path(os.environ.get("BATON_HOME") or default_home())


def _serve(args) -> int:
    from models.demo import DEMO_MODEL_NAME, ensure_demo_model
    from server.app import create_app
    from server.engines.transformers_engine import check_model_folder

    home = _home(args)
    path = args.model or ensure_demo_model(home)
    name = args.name or (path.name.lower() if args.model else DEMO_MODEL_NAME)
    check_model_folder(path, allow_pickle=args.allow_pickle)
    spec = ModelSpec(
        name=name,
        path=path,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        max_model_len=args.max_model_len,
        allow_pickle=args.allow_pickle,
    )
    settings = Settings(host=args.host, port=args.port, home=home, models=[spec], api_key=args.api_key)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def _demo(args) -> int:
    from models.demo import ensure_demo_model

    print(ensure_demo_model(_home(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
