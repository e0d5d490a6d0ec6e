"""LoRA adapters through PEFT: new ones configured from axolotl's lora_* keys, saved ones checked against the
base model (module paths, LoRA matrix shapes, vocabulary, architecture: :func:`check_adapter` before any weight
is read, :func:`adapter_fits` against a loaded model) and loaded by :func:`load_adapter`, the one loader that
training, inference, merge and export share."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.config.sections import AdapterSection
from lmforge.errors import LmforgeError


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (the `lora_target_modules` candidates), output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }
    conv1d = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if type(module).__name__ == "Conv1D"}
    return sorted(names | conv1d)


def lora_targets(settings: AdapterSection) -> Any:
    r"""peft's target_modules for the config: "all-linear", a list of names, a regex, or None (peft's default).

    A single string is what axolotl hands peft as is: a regular expression each module's full name must
    match (``model.layers.[\d]+.(mlp|self_attn).(up|down)_proj``); a plain layer name (``q_proj``) matches
    as a name, as in a list.
    """
    if settings.lora_target_linear:
        return "all-linear"
    if isinstance(settings.lora_target_modules, str):
        # axolotl's regex form ('model.language_model.layers.[\d]+.(mlp|self_attn).(q|k|v)_proj'): peft full-matches a
        # string against each module's path; a plain name stays a one-item list (matched as a name suffix)
        return settings.lora_target_modules if re.search(r"[\[\]()|*+?\\]", settings.lora_target_modules) else [settings.lora_target_modules]
    return settings.lora_target_modules


def ties_embeddings(model: torch.nn.Module) -> bool:
    """True when the output head shares the input embedding's weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight is model.get_input_embeddings().weight


def embedding_layer_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the input embedding and (unless tied to it) the output head: what modules_to_save takes."""
    wanted = [model.get_input_embeddings()]
    if not ties_embeddings(model) and model.get_output_embeddings() is not None:
        wanted.append(model.get_output_embeddings())
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    return [names[id(module)] for module in wanted if id(module) in names]


def cover_new_token_rows(
    settings: AdapterSection, model: torch.nn.Module, new_tokens: list[str], say: Callable[[str], None] | None = None
) -> AdapterSection:
    """Under LoRA the base weights stay frozen, so the embedding rows of tokens added for this run train only
    through lora_modules_to_save: put the embedding layers there when the user left it unset, else say what
    stays untrained."""
    if not new_tokens or not settings.adapter:
        return settings
    names = embedding_layer_names(model)
    listed = ", ".join(new_tokens[:6]) + (", ..." if len(new_tokens) > 6 else "")
    if settings.lora_modules_to_save is None:
        size = sum(p.numel() for module in _modules_named(model, names) for p in module.parameters())
        if say:
            say(f"{len(new_tokens)} tokens were added ({listed}) and their embedding rows start untrained: "
                f"lora_modules_to_save: [{', '.join(names)}] is set so they train ({size:,} more trainable parameters, "
                "saved with the adapter); set lora_modules_to_save yourself (e.g. []) to choose otherwise")
        return settings.model_copy(update={"lora_modules_to_save": names})
    missing = [name for name in names if name not in settings.lora_modules_to_save]
    if missing and say:
        say(f"warning: {len(new_tokens)} tokens were added ({listed}) but lora_modules_to_save lacks {', '.join(missing)}, "
            f"so their rows keep their initial values and the model can hardly learn to emit them; add {', '.join(missing)} to train them")
    return settings


def unfrozen_beside_adapter(settings: AdapterSection, model: torch.nn.Module, patterns: list[str],
                            say: Callable[[str], None] | None = None) -> AdapterSection:
    """unfrozen_parameters with an adapter (axolotl's meaning): the matching weights train fully beside it.

    Under peft, a weight trains fully and is saved with the adapter only through modules_to_save, so the
    modules that own a matching weight go there by their full names. Layers the adapter adapts already train
    through it and are left to LoRA (peft cannot both adapt a layer and copy it)."""
    from lmforge.models.params import check_patterns, unfrozen

    compiled = check_patterns(model, patterns)
    targets = lora_targets(settings)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    full, adapted = [], []
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if not own or not any(unfrozen(n, compiled) for n in own):
            continue
        leaf = name.rsplit(".", 1)[-1]
        linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        if linear and module is not head and (targets == "all-linear" or (targets is not None and leaf in targets)):
            adapted.append(name)
        else:
            full.append(name)
    chosen = list(settings.lora_modules_to_save or []) + [n for n in full if n not in (settings.lora_modules_to_save or [])]
    if say:
        size = sum(p.numel() for n in full for p in model.get_submodule(n).parameters(recurse=False))
        say(f"unfrozen_parameters with an adapter: {len(full)} modules train fully beside it ({size:,} parameters, saved with "
            f"the adapter as lora_modules_to_save)" + (f"; {len(adapted)} matching layers train through the adapter" if adapted else ""))
    return settings.model_copy(update={"lora_modules_to_save": chosen})


def _modules_named(model: torch.nn.Module, leaves: list[str]) -> list[torch.nn.Module]:
    return [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in leaves]


def lora_config(settings: AdapterSection, model: torch.nn.Module) -> Any:
    """A peft LoraConfig for a causal LM (or a reward model's sequence classifier) from the adapter section."""
    from peft import LoraConfig, TaskType

    scorer = type(model).__name__.endswith("ForSequenceClassification")  # reward_model: peft keeps its score head
    return LoraConfig(
        task_type=TaskType.SEQ_CLS if scorer else TaskType.CAUSAL_LM,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=lora_targets(settings),
        fan_in_fan_out=settings.lora_fan_in_fan_out,
        modules_to_save=settings.lora_modules_to_save,
        target_parameters=settings.lora_target_parameters,
        use_dora=settings.peft_use_dora,
        use_rslora=settings.peft_use_rslora,
        # A trained copy of a tied embedding must stay tied to the output head (peft unties it otherwise).
        ensure_weight_tying=bool(settings.lora_modules_to_save) and ties_embeddings(model),
    )


@torch.no_grad()
def loftq_on_cpu(model: Any, bits: int, iterations: int) -> int:
    """LoftQ on a machine without CUDA: PEFT's ``loftq_init`` steps (bitsandbytes' nf4 / int8 quantization, then the
    rank-r SVD of the residual, alternated `iterations` times) on the CPU, where PEFT hard-codes a CUDA device.

    As in PEFT, each adapted linear layer's base weight becomes its quantized-then-dequantized value and the adapter
    (A = R, B = L) the low-rank rest, so base + B·A starts near the full-precision weight. Returns the layers set."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils.loftq_utils import _low_rank_decomposition

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        base = module.get_base_layer()
        weight = base.weight.float()
        residual = weight.clone()
        for step in range(iterations):
            if bits == 4:
                packed = bnb.nn.Params4bit(residual, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
                dequantized = bnb.functional.dequantize_4bit(packed.data, packed.quant_state)
            else:
                packed = bnb.nn.Int8Params(residual, requires_grad=False).to("cpu")
                dequantized = bnb.functional.int8_vectorwise_dequant(packed.data, packed.SCB).float()
            residual = weight - dequantized
            low_rank = _low_rank_decomposition(residual, reduced_rank=max(module.r.values()))
            if step + 1 < iterations:
                residual = weight - low_rank["L"] @ low_rank["R"]
        for name in module.lora_A:
            module.lora_A[name].weight.data = low_rank["R"].to(module.lora_A[name].weight.dtype)
            module.lora_B[name].weight.data = low_rank["L"].to(module.lora_B[name].weight.dtype)
        base.weight.data = dequantized.to(base.weight.dtype)
        count += 1
    return count


def apply_lora(model: torch.nn.Module, settings: AdapterSection) -> Any:
    """Wrap `model` with a new LoRA adapter, or load `lora_model_dir` to continue training it."""
    from peft import get_peft_model

    if settings.lora_model_dir:
        return load_adapter(model, settings.lora_model_dir, trainable=True)
    loftq = (settings.peft or {}).get("loftq_config")  # bits and iterations, filled in by the config
    config = lora_config(settings, model)
    if loftq is not None and torch.cuda.is_available():  # PEFT's own LoftQ (it computes on CUDA)
        from peft import LoftQConfig

        config.init_lora_weights = "loftq"
        config.loftq_config = vars(LoftQConfig(**loftq))
    try:
        peft_model = get_peft_model(model, config)
        if loftq is not None and config.init_lora_weights != "loftq":
            loftq_on_cpu(peft_model, loftq["loftq_bits"], loftq["loftq_iter"])
        return peft_model
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target module" in str(exc):
            raise LmforgeError(
                f"lora_target_modules {settings.lora_target_modules} do not match any layer of this model",
                where="lora_target_modules",
                fix=f"choose from: {', '.join(linear_layer_names(model))} (or set lora_target_linear: true)",
            ) from exc
        if "ParamWrapper does not work with lora_dropout" in str(exc):
            # peft targets a mixture-of-experts block's fused 3-D expert weights through lora.ParamWrapper (what
            # lora_target_linear / target_parameters reach there), and that wrapper has no dropout
            raise LmforgeError(
                f"this model's experts are fused 3-D weights, which peft adapts without dropout, and lora_dropout is "
                f"{settings.lora_dropout}", where="lora_dropout",
                fix="set lora_dropout: 0 (or leave the experts out: lora_target_modules naming the attention projections)",
            ) from exc
        raise


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_weights(model: Any, folder: Any, **kwargs: Any) -> None:
    """``model.save_pretrained(folder, safe_serialization=True, **kwargs)``, without peft's two-line
    "Setting `save_embedding_layers` to `True`" warning: lmforge said so itself, in one line, when it
    added the tokens or put the embeddings in lora_modules_to_save; peft's "auto" still decides."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`", category=UserWarning)
        model.save_pretrained(folder, safe_serialization=True, **kwargs)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass
class AdapterCheck:
    """What the adapter needs from the base model, found by :func:`check_adapter`."""

    adapter_vocab: int | None  # rows of the adapter's saved embeddings / lm_head, if any
    base_vocab: int
    resize_to: int | None  # grow the base embeddings to this before loading the adapter


def read_adapter_config(lora_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``; LmforgeError when the folder is not a LoRA adapter."""
    folder = Path(lora_dir)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        if (folder / "config.json").is_file():
            raise LmforgeError(
                f"no {ADAPTER_CONFIG}: this folder holds a full model, not a LoRA adapter", where=f"lora_model_dir: {lora_dir}",
                fix=f"load it as the model instead (--model {lora_dir}), or point lora_model_dir at the adapter",
            )
        raise LmforgeError(
            f"no {ADAPTER_CONFIG} in the adapter folder",
            where=f"lora_model_dir: {lora_dir}",
            fix="point at the output_dir of a LoRA/QLoRA run (the folder with adapter_model.safetensors)",
        )
    config = json.loads(path.read_text())
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise LmforgeError(f"only LoRA adapters can be loaded, this one is {config.get('peft_type')}", where=str(path))
    return config


def trained_on(lora_dir: str | os.PathLike[str], adapter_config: dict[str, Any] | None = None) -> str:
    """The base model the adapter was trained on, as the user wrote it when lmforge saved its config."""
    saved = Path(lora_dir) / "config.yml"
    if saved.is_file():
        import yaml

        try:
            base = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("base_model")
        except yaml.YAMLError:
            base = None
        if base:
            return str(base)
    config = adapter_config if adapter_config is not None else read_adapter_config(lora_dir)
    return str(config.get("base_model_name_or_path") or "unknown (the adapter does not say)")


def _adapter_shapes(lora_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    path = lora_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        fix = "lmforge reads safetensors only; re-save the adapter with save_pretrained(safe_serialization=True)"
        if not (lora_dir / "adapter_model.bin").is_file():
            fix = "the training run did not finish saving; point at a complete adapter folder"
        raise LmforgeError(f"no {ADAPTER_WEIGHTS} in the adapter folder", where=str(lora_dir), fix=fix)
    from safetensors import SafetensorError

    try:  # opening checks the header and that the file is as long as it says (a cut-off copy is named here)
        with safe_open(str(path), framework="pt") as f:
            return {k.removeprefix(_PREFIX): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as exc:
        raise LmforgeError(f"the adapter weights are damaged or cut off ({exc})", where=str(path),
                           fix="copy the adapter folder again, or use a checkpoint-N folder of the run") from exc


def _module_path(key: str) -> str:
    """Adapter key → the base module it belongs to."""
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B",
                   ".base_layer.", ".modules_to_save.", ".original_module."):
        if marker in key:
            return key.split(marker)[0]
    return key.rsplit(".", 1)[0]  # a modules_to_save copy: "<module>.weight"


def check_adapter(base_model: str, lora_dir: str | os.PathLike[str]) -> AdapterCheck:
    """Refuse an adapter that does not fit ``base_model``, reading only configs and headers (before any weight loads)."""
    from transformers import AutoConfig

    from lmforge.models.inspect import model_skeleton
    from lmforge.models.load import local_model_dir

    base_config = AutoConfig.from_pretrained(local_model_dir(base_model))
    return adapter_fits(model_skeleton(base_config), lora_dir, base_model)


def adapter_fits(model: torch.nn.Module, lora_dir: str | os.PathLike[str], base_model: str) -> AdapterCheck:
    """Refuse an adapter that does not fit `model` (module paths, LoRA matrix shapes, vocabulary size,
    architecture), reading only the adapter's configs and headers; `model` may be a meta-device skeleton.
    `base_model` names the base in the messages."""
    lora_dir = Path(lora_dir)
    adapter_config = read_adapter_config(lora_dir)
    shapes = _adapter_shapes(lora_dir)
    base_config = model.config
    origin = trained_on(lora_dir, adapter_config)
    fix_base = f"the adapter was trained on {origin}: set base_model to that model, or pick an adapter trained on {base_model}"

    # A run that saved the base config next to the adapter pins the architecture.
    saved = lora_dir / "config.json"
    if saved.is_file():
        trained = json.loads(saved.read_text())
        for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key in trained and trained[key] != getattr(base_config, key, None):
                raise LmforgeError(
                    f"the adapter was trained on a different architecture: {key} is {trained[key]}"
                    f" there but {getattr(base_config, key, None)} in the base model",
                    where=f"base_model: {base_model}",
                    fix=fix_base,
                )

    skeleton = model
    modules = dict(skeleton.named_modules())
    targets = adapter_config.get("target_modules")
    if isinstance(targets, list):  # a string is a regex; the path check below covers it
        # peft matches an entry against a module's full name or any dotted suffix of it
        # (lmforge saves full paths for lora_target_linear, other tools leaf names like q_proj)
        suffixes = {name.split(".", i)[-1] for name in modules for i in range(name.count(".") + 1)}
        missing = sorted(set(targets) - suffixes)
        if missing:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in missing})  # 14 layer paths read as 7 names
            shown = ", ".join(leaves) + (f" ({len(missing)} module paths)" if len(missing) > len(leaves) else "")
            raise LmforgeError(
                f"target modules {shown} of the adapter do not exist in the base model",
                where=f"base_model: {base_model}",
                fix=fix_base,
            )

    embed_path = next(n for n, m in modules.items() if m is skeleton.get_input_embeddings())
    head = skeleton.get_output_embeddings()
    head_path = next((n for n, m in modules.items() if m is head), None)
    base_vocab = skeleton.get_input_embeddings().weight.shape[0]
    vocab_seen: dict[str, int] = {}

    order = {name: i for i, name in enumerate(modules)}
    # walk in model order so the first reported mismatch is the most telling (layer 0 q_proj)
    for key, shape in sorted(shapes.items(), key=lambda kv: order.get(_module_path(kv[0]), -1)):
        path = _module_path(key)
        if path not in modules:
            raise LmforgeError(
                f"the adapter has weights for '{path}', which the base model does not have"
                f" (the base has {getattr(base_config, 'num_hidden_layers', '?')} layers)",
                where=f"base_model: {base_model}",
                fix=fix_base,
            )
        module = modules[path]
        if path in (embed_path, head_path):
            if key.endswith("lora_embedding_A"):
                vocab_seen[key] = shape[1]
            elif path == head_path and ".lora_B." in key:
                vocab_seen[key] = shape[0]
            elif key.endswith((".weight",)) and ".lora_" not in key:
                vocab_seen[key] = shape[0]
            continue
        if isinstance(module, torch.nn.Linear):
            expected = None
            if ".lora_A." in key:
                expected, got = module.in_features, shape[1]
            elif ".lora_B." in key:
                expected, got = module.out_features, shape[0]
            if expected is not None and expected != got:
                raise LmforgeError(
                    f"'{path}' has {'input' if '.lora_A.' in key else 'output'} size {expected} in the base model"
                    f" but {got} in the adapter: the adapter was trained on a different model size",
                    where=f"base_model: {base_model}",
                    fix=fix_base,
                )

    if len(set(vocab_seen.values())) > 1:
        raise LmforgeError(
            f"the adapter's embedding shapes disagree: {vocab_seen}",
            where=str(lora_dir / ADAPTER_WEIGHTS),
            fix="the adapter file is inconsistent; re-save it from training",
        )
    adapter_vocab = next(iter(vocab_seen.values()), None)
    resize_to = None
    if adapter_vocab is not None and adapter_vocab != base_vocab:
        # Grown rows are only reproducible when the adapter saved every matrix that
        # holds them; otherwise resize_token_embeddings would invent fresh random rows.
        tied = bool(getattr(base_config, "tie_word_embeddings", False))

        def saved_full(path: str | None) -> bool:
            return any(k in shapes for k in (f"{path}.weight", f"{path}.base_layer.weight"))

        embed_full = saved_full(embed_path)
        head_full = tied or saved_full(head_path)
        if adapter_vocab < base_vocab or not (embed_full and head_full):
            raise LmforgeError(
                f"vocabulary size differs: the adapter's embeddings have {adapter_vocab} rows,"
                f" the base model has {base_vocab}",
                where=f"base_model: {base_model}",
                fix=fix_base
                + "; if tokens were added for training, train with lora_modules_to_save: [embed_tokens, lm_head]"
                " so the grown embeddings are saved with the adapter",
            )
        resize_to = adapter_vocab
    return AdapterCheck(adapter_vocab=adapter_vocab, base_vocab=base_vocab, resize_to=resize_to)


def load_adapter(model: Any, lora_dir: str | os.PathLike[str], trainable: bool, *, check: AdapterCheck | None = None,
                 base_model: str | None = None) -> Any:
    """The one way a saved LoRA adapter is put on a model (training's continue-from-adapter, inference,
    merge, export): checked against `model` first (:func:`adapter_fits`, or `check` when the caller ran
    :func:`check_adapter` before loading any weight), embeddings grown to the adapter's saved rows, then
    peft's loader; `trainable` leaves the adapter weights trainable."""
    from peft import PeftModel

    name = base_model or str(getattr(model.config, "_name_or_path", "") or "the base model")
    check = check if check is not None else adapter_fits(model, lora_dir, name)
    if check.resize_to is not None and check.resize_to != model.get_input_embeddings().num_embeddings:
        # the saved rows overwrite whatever resize puts there; skip the slow mean-resizing
        model.resize_token_embeddings(check.resize_to, mean_resizing=False)
    try:
        return PeftModel.from_pretrained(model, str(lora_dir), is_trainable=trainable)
    except (ValueError, OSError, RuntimeError) as exc:
        raise LmforgeError(f"could not load the adapter: {str(exc).splitlines()[0]}", where=f"lora_model_dir: {lora_dir}",
                           fix="point lora_model_dir at the output_dir of a LoRA run on this base model") from exc
