"""Command line: parse arguments, load the config, call one recipe. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable

from lmforge.errors import LmforgeError


def _config(args: argparse.Namespace, overrides: list[str], check_paths: bool = True):  # noqa: ANN202
    from lmforge.config import load_config

    return load_config(args.config, overrides, check_paths=check_paths)


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.train import run_train

    run_train(_config(args, overrides))


def cmd_preprocess(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.preprocess import run_preprocess

    run_preprocess(_config(args, overrides))


def cmd_inference(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.inference import run_inference

    run_inference(_config(args, overrides, check_paths=False), args.lora_model_dir, args.prompt, args.max_new_tokens, args.temperature)


def cmd_validate(args: argparse.Namespace, overrides: list[str]) -> None:
    import yaml

    cfg = _config(args, overrides)
    print(yaml.safe_dump(cfg.flat(), sort_keys=False), end="")
    for key, why in cfg.ignored.items():
        print(f"# accepted with no effect: {key} ({why})")
    print(f"# {args.config}: valid", file=sys.stderr)


def cmd_config_schema(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.config import json_schema

    print(json.dumps(json_schema(), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train language models from one YAML file. Any config key can be overridden as --key=value.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable, help_text: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            p.add_argument("config", help="YAML config: a path or an http(s) URL")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        p.set_defaults(func=func)
        return p

    add("train", cmd_train, "fine-tune as the config says")
    add("preprocess", cmd_preprocess, "read, format and tokenize the datasets and report what they hold")
    p = add("inference", cmd_inference, "generate answers with the base model or a trained adapter")
    p.add_argument("--lora_model_dir", "--lora-model-dir", default=None, help="adapter folder (a training output_dir)")
    p.add_argument("--prompt", default=None, help="one prompt; without it, prompts are read from stdin, one per line")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    add("validate", cmd_validate, "check a config (keys, types, files) without loading a model; print it resolved")
    add("config-schema", cmd_config_schema, "print the JSON schema of the config", config=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--")]
    if bad:
        parser.error(f"unexpected arguments: {' '.join(bad)} (overrides are written --key=value)")
    debug = getattr(args, "debug", False)
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        # Libraries' deprecation notices are for lmforge's developers, not its users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        args.func(args, rest)
    except LmforgeError as exc:
        if debug:
            raise
        print(f"error: {exc.format()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an lmforge bug or an unforeseen library failure: one line, details on --debug
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
