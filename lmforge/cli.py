"""Command line: parse arguments, load the config, call one recipe. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable

from lmforge.errors import LmforgeError


def _config(args: argparse.Namespace, overrides: list[str], check_paths: bool = True):  # noqa: ANN202
    from lmforge.config import load_config

    cfg = load_config(args.config, overrides, check_paths=check_paths)
    for notice in cfg.notices:  # keys accepted because they change nothing here: one line each, with file:line
        print(f"notice: {notice.line()}", file=sys.stderr)
    return cfg


def _finetune_config(args: argparse.Namespace, overrides: list[str], command: str):  # noqa: ANN202
    cfg = _config(args, overrides)
    if cfg.data.datasets is None or cfg.model.base_model is None:
        raise LmforgeError(f"`lmforge {command}` reads datasets with a base_model's tokenizer; this is a pretraining config",
                           where=args.config, fix="add datasets and base_model, or run `lmforge pretrain` (it tokenizes into shards)")
    return cfg


def _settle_threads(cfg) -> None:  # noqa: ANN001
    """CPU threads and how they wait, decided before the recipe imports torch (lmforge/train/threads.py)."""
    from lmforge.train.threads import settle_threads

    notice = settle_threads(cfg.training.torch_threads).notice
    if notice and os.environ.get("RANK", "0") == "0":
        print(f"note: {notice}", file=sys.stderr)


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> None:
    cfg = _config(args, overrides)
    _settle_threads(cfg)
    from lmforge.recipes.finetune import run_train

    if cfg.is_pretraining:  # model_config / pretraining_dataset: what axolotl's `train` does with them too
        from lmforge.recipes.pretrain import run_pretrain

        run_pretrain(cfg)
    else:
        run_train(cfg)


def cmd_pretrain(args: argparse.Namespace, overrides: list[str]) -> None:
    cfg = _config(args, overrides)
    _settle_threads(cfg)
    from lmforge.recipes.pretrain import run_pretrain

    run_pretrain(cfg)


def cmd_tokenizer(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.tokenizer import run_tokenizer_train

    cfg = _config(args, overrides, check_paths=False) if args.config else None
    flags = {k: getattr(args, k) for k in ("files", "vocab_size", "model_type", "backend", "output_dir")}
    run_tokenizer_train(cfg, flags)


def cmd_preprocess(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.preprocess import run_preprocess

    run_preprocess(_finetune_config(args, overrides, "preprocess"))


def cmd_data(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.data_report import run_data_report

    run_data_report(_finetune_config(args, overrides, "data report"))


def _sampling_flags(args: argparse.Namespace):  # noqa: ANN202
    from lmforge.recipes.inference import SamplingFlags

    return SamplingFlags(**{k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")})


def cmd_inference(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.inference import run_inference

    run_inference(
        _config(args, overrides, check_paths=False), args.lora_model_dir, args.prompt, model=args.model,
        flags=_sampling_flags(args), jsonl=args.jsonl, input_path=args.input, output_path=args.output,
        batch_size=args.batch_size, chat=args.chat, save_path=args.save, system=args.system, gradio=args.gradio,
        host=args.host, port=args.port, share=args.share, image=args.image,
    )


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.inference import run_serve

    run_serve(
        _config(args, overrides, check_paths=False), args.lora_model_dir, model=args.model, flags=_sampling_flags(args),
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LMFORGE_API_KEY"), model_name=args.model_name,
        max_tokens=args.max_tokens, request_timeout=args.request_timeout,
    )


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> None:
    cfg = _config(args, overrides, check_paths=False)
    _settle_threads(cfg)
    from lmforge.recipes.evaluation import EvalOptions, run_eval

    run_eval(cfg, EvalOptions(
        lora_model_dir=args.lora_model_dir, model=args.model, tasks=args.tasks, limit=args.limit, base=args.base, data=args.data,
        output=args.output, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, cache=not args.no_cache,
    ))


def cmd_validate(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.validate import run_validate

    run_validate(_config(args, overrides), args.config, print_config=args.print_config)


def cmd_config_schema(args: argparse.Namespace, overrides: list[str]) -> None:
    if args.table or args.markdown:
        from lmforge.config.keydocs import markdown, text_table

        print(markdown() if args.markdown else text_table(), end="")
        return
    from lmforge.config import json_schema

    print(json.dumps(json_schema(), indent=2))


def cmd_merge_lora(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.export import run_merge

    run_merge(_config(args, overrides, check_paths=False), args.lora_model_dir, args.output_dir)


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.export import run_export

    run_export(_config(args, overrides, check_paths=False), args.format, args.quant, args.lora_model_dir, args.output,
               tokenizer_pre=args.tokenizer_pre, keep_merged=args.keep_merged, imatrix=args.imatrix,
               imatrix_chunks=args.imatrix_chunks)


def cmd_quantize(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.quantize import run_quantize

    run_quantize(_config(args, overrides, check_paths=False), args.model, args.output)


def cmd_inspect(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.recipes.export import run_inspect

    cfg = None
    if args.config:
        from lmforge.config import load_config

        cfg = load_config(args.config, overrides, check_paths=False)
    run_inspect(args.model, cfg)


def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> None:
    from lmforge.plan.render import PlanOptions
    from lmforge.recipes.plan import run_plan

    options = PlanOptions(gpu=args.gpu, num_gpus=args.num_gpus, strategy=args.strategy, offload=args.offload,
                          prices=args.prices, mfu=args.mfu, use_data=not args.no_data)
    run_plan(_config(args, overrides), options, as_json=args.json, measure=args.measure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train language models from one YAML file. Any config key can be overridden as --key=value.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks (and what --verbose shows)")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own progress bars, warnings and notices")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable, help_text: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            p.add_argument("config", help="YAML config: a path or an http(s) URL")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="show the libraries' progress bars and warnings")
        p.set_defaults(func=func)
        return p

    for p in (add("train", cmd_train, "fine-tune as the config says (pretrains when it sets model_config or pretraining_dataset)"),
              add("pretrain", cmd_pretrain, "pretrain a model from scratch (model_config) or continue pretraining (base_model) on raw text")):
        p.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="train on N ranks of this machine (starts torchrun --standalone --nproc_per_node N): "
                            "DDP, or FSDP2 / DeepSpeed as the config says")
    help_text = "`tokenizer train [CONFIG] [--files ...]`: train a BPE/unigram tokenizer (config's tokenizer_train, flags on top)"
    p = sub.add_parser("tokenizer", help=help_text, description=help_text)
    p.add_argument("action", choices=["train"])
    p.add_argument("config", nargs="?", default=None, help="YAML config with tokenizer_train (optional)")
    p.add_argument("--files", nargs="+", default=None, help="text files or globs to train on")
    p.add_argument("--vocab_size", "--vocab-size", type=int, default=None)
    p.add_argument("--model_type", "--model-type", choices=["bpe", "unigram"], default=None)
    p.add_argument("--backend", choices=["sentencepiece", "hf"], default=None)
    p.add_argument("--output_dir", "--output-dir", default=None, help="where to save it (default: OUTPUT_DIR/tokenizer or ./tokenizer)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="show the libraries' progress bars and warnings")
    p.set_defaults(func=cmd_tokenizer)
    add("preprocess", cmd_preprocess, "read, format and tokenize the datasets and report what they hold")
    p = add("quantize", cmd_quantize, "quantize the trained model with torchao as its qat: settings say (axolotl quantize)")
    p.add_argument("--model", default=None, help="the model folder to quantize (default: the config's output_dir)")
    p.add_argument("--output", default=None, help="where the quantized model goes (default: OUTPUT_DIR/quantized)")
    help_text = "`data report CONFIG`: rows, tokens, lengths, duplicates, overlap, label share → output_dir (Markdown + PNG)"
    p = sub.add_parser("data", help=help_text, description=help_text)
    p.add_argument("action", choices=["report"])
    p.add_argument("config", help="YAML config: a path or an http(s) URL")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="show the libraries' progress bars and warnings")
    p.set_defaults(func=cmd_data)
    def add_model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--lora_model_dir", "--lora-model-dir", default=None,
                       help="LoRA adapter folder (a training output_dir), checked against the base model before loading")
        p.add_argument("--model", default=None,
                       help="load this instead of base_model: a merged folder, a .gguf file, pkg://PACKAGE/FILE or a Hub id")
        g = p.add_argument_group("sampling (default: the config's max_new_tokens, temperature, ... keys)")
        g.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=None, help="most tokens per answer (256)")
        g.add_argument("--temperature", type=float, default=None, help="0 is greedy (the default)")
        g.add_argument("--top_p", "--top-p", type=float, default=None, help="nucleus sampling (1: off)")
        g.add_argument("--top_k", "--top-k", type=int, default=None, help="sample among the k likeliest tokens (0: off)")
        g.add_argument("--repetition_penalty", "--repetition-penalty", type=float, default=None, help="1: off")
        g.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's seed)")

    p = add("inference", cmd_inference, "generate answers with the base model, a trained adapter, a merged folder or a GGUF file")
    add_model_flags(p)
    p.add_argument("--prompt", default=None, help="one prompt; without it, prompts are read from stdin, one per line")
    p.add_argument("--image", default=None, help="--prompt: an image file the prompt is about (image-text models)")
    p.add_argument("--jsonl", action="store_true",
                   help='batch mode: JSON lines in ({"prompt": ...} or {"messages": [...]}), one JSON line out per input')
    p.add_argument("--input", default=None, help="read prompts from this file instead of stdin")
    p.add_argument("--output", default=None, help="--jsonl: write answers to this file (default stdout)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=8, help="--jsonl: prompts generated together (8)")
    p.add_argument("--chat", action="store_true", help="interactive terminal chat (/retry, /undo, /save, /exit)")
    p.add_argument("--save", default="chat.jsonl", help="--chat: the file /save appends to (chat JSONL)")
    p.add_argument("--system", default=None, help="--chat: a system message (chat-template formats only)")
    p.add_argument("--gradio", action="store_true", help="web chat UI (gradio), on 127.0.0.1 unless --host says otherwise")
    p.add_argument("--host", default=None, help="--gradio: address to listen on (default gradio_server_name or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="--gradio: port (default gradio_server_port or 7860)")
    p.add_argument("--share", action="store_true", default=None, help="--gradio: also make a public gradio.live link")
    p = add("serve", cmd_serve, "OpenAI-compatible HTTP server (/v1/models, /v1/chat/completions, /v1/completions)")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", "--api-key", default=None, help="require this bearer token (or set LMFORGE_API_KEY)")
    p.add_argument("--model_name", "--model-name", default=None, help="the model id clients see (default: the adapter's or model's folder name)")
    p.add_argument("--max_tokens", "--max-tokens", type=int, default=None,
                   help="the most tokens one request may ask for; above it, HTTP 400 (default 1024, or --max_new_tokens if larger)")
    p.add_argument("--request_timeout", "--request-timeout", type=float, default=None,
                   help='seconds one generation may run once started; then its answer ends, finish_reason "length" (default 300; 0: no limit)')
    p = add("eval", cmd_eval, "score the tuned model and its base: held-out task metrics, lm-eval tasks, forgetting, in one table")
    p.add_argument("--lora_model_dir", "--lora-model-dir", default=None,
                   help="the tuned adapter (a LoRA run's output_dir or checkpoint; default: the config's output_dir)")
    p.add_argument("--model", default=None,
                   help="the tuned model instead: a merged folder, a .gguf file, a full fine-tune's output or checkpoint folder")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="lm-eval tasks (default: lm_eval_tasks); gsm8k_local and mmlu_dev_local run offline")
    p.add_argument("--limit", type=int, default=None, help="held-out examples (and lm-eval documents per task) to score")
    p.add_argument("--base", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the base model, in the same table (default; its row is cached by the weights' hash)")
    p.add_argument("--data", default=None, help="held-out rows in the training data's shape (default: test_datasets, else the val_set_size split)")
    p.add_argument("--output", default=None, help="report folder (default: OUTPUT_DIR/eval)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=8, help="prompts generated together (8)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=None, help="most tokens per answer (default: max_new_tokens, 256)")
    p.add_argument("--no_cache", "--no-cache", dest="no_cache", action="store_true", help="recompute the base row")
    p = add("plan", cmd_plan, "before training: peak memory per device, the GPUs that fit, time and cost, what to change")
    p.add_argument("--gpu", default=None, help="the GPU to plan for (t4, a10, l4, 3090, 4090, a6000, a100-40gb, a100, h100, h200, mi300x)")
    p.add_argument("--num-gpus", "--num_gpus", dest="num_gpus", type=int, default=None, help="devices to train on (default 1)")
    p.add_argument("--strategy", choices=["ddp", "zero1", "zero2", "zero3", "fsdp"], default=None,
                   help="how N devices share the run (default: ddp when --num-gpus > 1)")
    p.add_argument("--offload", choices=["optimizer", "params"], default=None, help="keep optimizer states (or everything) in CPU RAM")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--measure", action="store_true", help="run a few real training steps here to calibrate the MFU")
    p.add_argument("--prices", default=None, help="price file (default ~/.config/lmforge/prices.yml, else the shipped example)")
    p.add_argument("--mfu", type=float, default=None, help="MFU to assume on GPUs (default 0.35)")
    p.add_argument("--no-data", "--no_data", dest="no_data", action="store_true", help="do not read the data: assume full rows")
    p = add("validate", cmd_validate, "check a config (keys, cross-key rules, data files and their tokens) without loading a model")
    p.add_argument("--print-config", "--print_config", dest="print_config", action="store_true",
                   help="also print the config resolved (every key with its value, YAML on stdout)")
    p = add("config-schema", cmd_config_schema, "print the JSON schema of the config, or the table of every axolotl key", config=False)
    p.add_argument("--table", action="store_true", help="every axolotl key and what lmforge does with it, as text")
    p.add_argument("--markdown", action="store_true", help="the same table as Markdown (docs/CONFIG_KEYS.md)")
    p = add("merge-lora", cmd_merge_lora, "merge a LoRA adapter into the base model (safetensors folder)")
    p.add_argument("--lora_model_dir", "--lora-model-dir", default=None, help="adapter folder (default: output_dir)")
    p.add_argument("--output_dir_merged", "--merged-dir", dest="output_dir", default=None, help="where to write (default: ADAPTER/merged)")
    p = add("export", cmd_export, "export the (merged) model, e.g. to GGUF for llama.cpp")
    p.add_argument("--format", default="gguf", choices=["gguf", "gguf-lora"],
                   help="gguf: the merged model; gguf-lora: the adapter alone, for llama.cpp's --lora")
    # checked by the export recipe, whose one-line refusal lists every type (argparse's would take two lines)
    p.add_argument("--quant", default="f16", help="f32, f16, q8_0, q5_1, q5_0, q4_1, q4_0, q2_k, q3_k_s, q3_k_m,"
                   " q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m or q6_k")
    p.add_argument("--lora_model_dir", "--lora-model-dir", default=None, help="adapter to merge first (merged in memory)")
    p.add_argument("--output", default=None, help="file to write (default: output_dir/model-QUANT.gguf)")
    p.add_argument("--keep_merged", "--keep-merged", nargs="?", const=True, default=None, metavar="DIR",
                   help="also save the merged model as a safetensors folder (default DIR: ADAPTER/merged)")
    p.add_argument("--tokenizer_pre", "--tokenizer-pre", default=None, metavar="NAME",
                   help="llama.cpp pre-tokenizer name, when it cannot be carried over from a GGUF base or identified")
    p.add_argument("--imatrix", default=None, metavar="FILE",
                   help="K-quants: quantize with this llama.cpp importance matrix; computed from the training data"
                   " and written there (llama.cpp's format) when FILE does not exist")
    p.add_argument("--imatrix_chunks", "--imatrix-chunks", type=int, default=32, metavar="N",
                   help="windows of sequence_len training tokens to compute the imatrix from (default 32)")
    p = add("inspect", cmd_inspect, "show a model's architecture and its lora_target_modules candidates", config=False)
    p.add_argument("model", help="model folder, .gguf file, pkg://PACKAGE/FILE or Hub id")
    p.add_argument("--config", default=None, help="a config whose LoRA settings to count trainable parameters for")
    return parser


def quiet_libraries() -> None:
    """Hide the libraries' own progress bars, advice and deprecation notices (``--verbose`` shows them).

    The one place lmforge sets them, each through the library's own switch, before the library is
    imported: environment variables the libraries read (and pass on to worker processes), the
    warning filter of this process, and bitsandbytes' logger. lmforge's own lines and its training
    progress bar (which asks for itself with ``disable=False``) stay.
    """
    quiet = {
        "TRANSFORMERS_VERBOSITY": "error",        # transformers' logger: errors only
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",      # huggingface_hub's bars, and transformers' ("Loading weights")
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' ("Generating train split", "Map")
        "TQDM_DISABLE": "1",                      # bars made with plain tqdm (GGUF de-quantization), unless asked for
        "HF_HUB_VERBOSITY": "error",
    }
    for name, value in quiet.items():
        os.environ.setdefault(name, value)
    # Libraries' deprecation notices are for lmforge's developers, not its users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # bitsandbytes (imported by peft) logs a failed optional-kernel fetch at import on CPUs.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # torchao (imported by peft when installed) logs each CUDA-only library it cannot load, and its Enum
    # registrations make torch's pytree logger warn about a deprecation, on every import.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # DeepSpeed, once installed, is imported by transformers and peft along the way, and says "Setting
    # accelerator to CPU" (on stdout) on every machine without a GPU. It sets its logger's level itself
    # when imported, so a level set here would be undone; a filter on that logger stays: errors only.
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters (which a key or a row may hold) escaped,
    so that an error stays one line on the terminal and in logs."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--")]
    if bad:
        parser.error(f"unexpected arguments: {' '.join(bad)} (overrides are written --key=value)")
    debug = getattr(args, "debug", False)
    nproc = getattr(args, "nproc", None)
    quiet = not (debug or getattr(args, "verbose", False))
    if nproc is not None:
        from lmforge.train.distributed import relaunch

        try:
            relaunch(nproc, argv, quiet=quiet)  # becomes torchrun, which starts N ranks of this command (unless it is one already)
        except LmforgeError as exc:
            print(f"error: {exc.format()}", file=sys.stderr)
            return 2
    if quiet:
        quiet_libraries()
    try:
        args.func(args, rest)
    except LmforgeError as exc:
        if debug:
            raise
        print(f"error: {one_line(exc.format())}", file=sys.stderr)
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
