"""Causal-LM loss as a (sum, count) pair, so gradient accumulation weights every token equally.

The fast path runs the model's backbone and applies the output head only to positions
that carry a label. In instruction tuning half or more of the positions are prompt or
padding; skipping their vocab-sized logits saves both time and the largest activation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.data.batching import host_batch
from lmforge.data.prepare import IGNORE_INDEX

# Architectures whose logits are exactly head(last_hidden_state): no softcapping or scaling
# after the head, so computing the head ourselves is equivalent to model(...).logits.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "smollm3", "olmo2", "gpt_neox", "mixtral"}


def base_model_of(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def uses_fast_path(model: Any) -> bool:
    base = base_model_of(model)
    return getattr(base.config, "model_type", None) in PLAIN_HEAD_MODELS and hasattr(base, "base_model_prefix")


def router_aux_loss_coef(model: Any) -> float | None:
    """The router load-balancing loss weight of a mixture-of-experts model whose config asks for it
    (``output_router_logits: true``, e.g. through model_config), else None."""
    config = base_model_of(model).config
    if not getattr(config, "output_router_logits", False) or not hasattr(config, "router_aux_loss_coef"):
        return None
    return float(config.router_aux_loss_coef or 0.0)


def flash_segments(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Flash-attention's variable-length arguments for a packed batch under a flash backend, else nothing.

    transformers splits packed rows into examples for flash-attention only when the batch holds one
    row (``_is_packed_sequence``); with several rows it runs plain causal attention over each row,
    and a packed example would attend to the examples before it. Given ``cu_seq_lens`` (the
    collator's segment starts over the batch flattened to one row), it runs flash_attn_varlen_func
    over exactly those segments for any number of rows. The row width bounds the longest segment,
    which is all the kernel needs from max_length (and reading the true maximum would sync the device).
    """
    boundaries = batch.get("cu_seq_lens")
    if boundaries is None or not str(getattr(base_model_of(model).config, "_attn_implementation", "")).startswith("flash"):
        return {}
    width = batch["input_ids"].shape[1]
    return {"cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries, "max_length_q": width, "max_length_k": width}


def _fused_head_loss(fused: str, head: Any, hidden: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The output head and the summed cross-entropy in one GPU kernel, never holding the logits:
    Liger's fused linear cross-entropy or Cut Cross-Entropy (models.kernels.fused_loss chose which)."""
    if getattr(head, "bias", None) is not None:
        raise ValueError("fused head losses need an output head without bias")
    if fused == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)(head.weight, hidden, targets)
    from cut_cross_entropy import linear_cross_entropy

    if label_smoothing:
        raise ValueError("cut_cross_entropy does not smooth labels; use liger_fused_linear_cross_entropy")
    return linear_cross_entropy(hidden, head.weight, targets, reduction="sum")


def _chunked_head_loss(head: Any, hidden: torch.Tensor, targets: torch.Tensor, chunks: int,
                       label_smoothing: float) -> torch.Tensor:
    """Head + summed cross-entropy in `chunks` slices of the labelled positions, each recomputed in backward.

    The full-vocabulary logits (fp32, and their gradient) never exist at once: only one slice's do,
    in forward and again in backward. Costs one more head forward per labelled token. Under no_grad
    (evaluation) each slice's logits are freed before the next slice's are computed.
    """
    from torch.utils.checkpoint import checkpoint

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum", label_smoothing=label_smoothing)

    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.chunk(chunks), targets.chunk(chunks)):
        total = total + checkpoint(piece, h, t, use_reentrant=False)
    return total


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0,
                   fused: str | None = None, loss_chunks: int = 1,
                   token_weights: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    `label_smoothing` (0..1) mixes the one-hot target with a uniform one, as in torch's cross_entropy.
    `fused` ('liger', 'cce'; CUDA only) computes head and loss in one kernel on the fast path.
    `loss_chunks` > 1 (config `chunked_cross_entropy`) computes head and loss in that many slices of the
    labelled positions, so the vocabulary-sized logits never exist whole (same loss, less memory).
    `token_weights` maps the labelled positions' logits to one weight per token (no gradient flows through it):
    the sum is then of weighted token losses, still over `count` tokens (the use_eaft objective).
    """
    if token_weights is not None and (fused or loss_chunks > 1):
        raise ValueError("token_weights needs the labelled positions' logits, which a fused or chunked head never builds")
    input_ids, labels = batch["input_ids"], batch["labels"]
    # Data-dependent facts (is there padding, where are the labels) are read from the batch's CPU copy:
    # read from device tensors, each would be a host-device sync that stalls the GPU's queue.
    host = host_batch(batch)
    attention_mask = batch.get("attention_mask")
    position_ids = batch.get("position_ids")
    if position_ids is not None:
        # Packed rows: position ids restarting per example make transformers build a
        # block-diagonal causal mask, which a 2D attention_mask would override.
        attention_mask = None
    elif attention_mask is not None and bool(host["attention_mask"].all()):
        attention_mask = None  # no padding: lets SDPA take its plain causal kernel
    extra = {"position_ids": position_ids, **flash_segments(model, batch)} if position_ids is not None else {}
    # (row, column) of every labelled position, as integer indices: gathering with them needs no
    # sync, where boolean-mask indexing of a device tensor waits for the device to count the mask.
    positions = (host["labels"][:, 1:] != IGNORE_INDEX).nonzero()
    if labels.device.type == "cuda":
        positions = positions.pin_memory()  # so the copy below is truly asynchronous (pageable memory may wait)
    positions = positions.to(labels.device, non_blocking=True)
    count = positions.shape[0]
    rows, columns = positions.unbind(1)
    targets = labels[:, 1:][rows, columns]
    aux_coef = router_aux_loss_coef(model)
    if aux_coef is not None:
        # A mixture-of-experts model computes its router's load-balancing loss itself (transformers'
        # load_balancing_loss_func, from the router logits it records): its full forward gives it.
        # transformers adds coef * aux to the mean token loss; as a sum over `count` tokens that is
        # coef * aux * count, so the token-weighted mean the loop takes equals transformers' loss.
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_router_logits=True, **extra)
        loss_sum = _token_loss_sum(outputs.logits[rows, columns], targets, label_smoothing, token_weights)
        aux = getattr(outputs, "aux_loss", None)
        return (loss_sum if aux is None else loss_sum + aux_coef * aux.float() * count), count
    if uses_fast_path(model):
        base = base_model_of(model)
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).last_hidden_state
        if fused:
            return _fused_head_loss(fused, base.get_output_embeddings(), hidden[rows, columns], targets,
                                    label_smoothing), count
        if loss_chunks > 1:  # in evaluation too: there the full logits would be the run's largest tensor
            head_loss = _chunked_head_loss(base.get_output_embeddings(), hidden[rows, columns], targets,
                                           loss_chunks, label_smoothing)
            return head_loss, count
        logits = base.get_output_embeddings()(hidden[rows, columns])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits[rows, columns]
    return _token_loss_sum(logits, targets, label_smoothing, token_weights), count


def _token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float,
                    token_weights: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Summed cross-entropy of the labelled positions' logits, each token's loss weighted when `token_weights` is given."""
    if token_weights is None:
        return F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=label_smoothing)
    with torch.no_grad():
        weights = token_weights(logits)
    per_token = F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=label_smoothing)
    return (per_token * weights).sum()
