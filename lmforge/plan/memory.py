"""Peak memory of one training process per device, modelled on what lmforge actually does.

What lmforge does, and so what is counted (see models/setup.py, train/loss.py, train/loop.py):
- Full fine-tuning keeps fp32 weights; under bf16 autocast every matmul weight gets a bf16 copy
  that stays alive from the forward pass to its backward (with gradient checkpointing only the
  head's does: the layers' copies come back one layer at a time in the recompute).
- LoRA holds the frozen base in bf16 when bf16 is on (else fp32); the adapter's weights, gradients
  and optimizer states are fp32; LoRA inputs stay bf16 (no fp32 copy per adapted layer).
- QLoRA holds the base's layer projections in NF4 (or int8); peft's k-bit preparation casts
  everything else (embeddings, head, norms) to fp32. Each 4-bit matmul dequantizes its weight
  into a bf16 scratch that is freed right after; it saves no input for backward.
- The output head runs only on labelled positions: logits are (labelled tokens x vocabulary),
  then cast to fp32 for the loss. Models with logit soft-capping (Gemma 2) take the slow path:
  logits at every position.
- Batches are grouped by length and padded to their longest row; a padded or packed batch makes
  SDPA take an explicit mask (saved per layer, B x S x S) and repeat grouped K/V heads.

Activations are counted tensor by tensor: what autograd saves for backward in a Llama-layout
decoder layer (RMSNorm, q/k/v/o, SDPA, gated MLP, LoRA adapters with or without dropout), in the
dtype each is saved in. tests/test_plan_memory.py checks these counts against the tensors torch
actually saves (``saved_tensors_hooks``), and bench/plan_memory.py checks the whole estimate
against a real run's peak RSS.

Phases: the peak is the largest of (a) the start of backward (everything the forward saved plus
the loss buffers), (b) the end of backward (all gradients, activations gone; under checkpointing
one recomputed layer) and (c) the optimizer step (gradients, states and the step's scratch).
Backward frees each layer's activations as it allocates its gradients, linearly in the layer
index, so the peak of the walk is at one of its ends. Optimizer states exist from the first step
on, so a run of two or more steps pays them in every phase.

Per device on a GPU, the CUDA context and the caching allocator's slack are added; on a CPU the
resident memory glibc keeps beyond the live tensors (CpuOverhead, calibrated by the bench).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

from lmforge.models.params import unfrozen
from lmforge.plan.arch import ModelShape
from lmforge.plan.hardware import GiB, Device
from lmforge.plan.inputs import PlanInputs
from lmforge.train.loss import PLAIN_HEAD_MODELS  # architectures whose head runs on labelled positions only
from lmforge.train.optimizers import ADAMW_NAMES as ADAMW

# peft's default target_modules for Llama-layout models (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")
CUDA_CONTEXT_BYTES = int(0.75 * GiB)  # CUDA/ROCm context, cuBLAS workspaces: outside the allocator's count
GPU_ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation (reserved over allocated), typical
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit states for smaller tensors
BNB_BLOCK = 256  # bitsandbytes 8-bit optimizer block size (one fp32 absmax per block)


@dataclass(frozen=True)
class Batch:
    """The micro-batch that sets the peak: rows x width tokens, how many carry a label, padded or not."""

    rows: int
    width: int
    labelled: int
    masked: bool  # padding or packing: SDPA gets an explicit mask
    source: str = "assumed"

    @property
    def tokens(self) -> int:
        return self.rows * self.width

    @classmethod
    def assumed(cls, inputs: PlanInputs) -> "Batch":
        """Without the data: every row full (sequence_len); all positions labelled (the upper bound)."""
        rows, width = inputs.micro_batch_size, inputs.sequence_len
        return cls(rows, width, rows * (width - 1), inputs.sample_packing,
                   "assumed: every row sequence_len tokens long, every position labelled (worst case)")


@dataclass
class MemoryEstimate:
    """Bytes per device at the peak, by component, plus what sits in host RAM."""

    device: str
    bf16: bool
    peak_bytes: int
    phase: str
    breakdown: dict[str, int]
    host_bytes: int = 0
    live_peak_bytes: int = 0  # tensors only (what torch.cuda.max_memory_allocated counts)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def fits(self, device: Device) -> bool:
        return self.peak_bytes <= device.memory_bytes


# --------------------------------------------------------------------------- parameters


def lora_target_names(inputs: PlanInputs, shape: ModelShape) -> set[str]:
    """Leaf module names LoRA wraps (peft matches target_modules as name suffixes)."""
    linear = set(shape.linear_names())
    if inputs.lora_target_linear:
        return linear
    targets = inputs.lora_targets or PEFT_DEFAULT_TARGETS
    return {name for name in linear if any(name == t.split(".")[-1] for t in targets)}


@dataclass
class ParamMemory:
    base: int = 0  # frozen or trained base weights, as held
    adapter: int = 0  # LoRA/DoRA weights (+ modules_to_save copies)
    trainable_numel: int = 0
    trainable: list[int] = field(default_factory=list)  # numel of each trainable tensor (optimizer states)
    trainable_shapes: list[tuple[int, ...]] = field(default_factory=list)
    matmul_fp32_numel: int = 0  # fp32 weights a bf16 autocast forward copies to bf16
    largest_dequant: int = 0  # the biggest 4-bit weight a matmul dequantizes (bf16 scratch)
    dora_scratch: int = 0  # DoRA's per-module dense temporaries (forward)
    quantized_bytes: int = 0  # the 4/8-bit weights (QLoRA)
    layer_numel: int = 0  # parameters of the largest layer (sharded gathers)
    first_trained_layer: int = 0  # layers below save no activations (nothing there needs a gradient)
    adapted: dict[str, tuple[int, int]] = field(default_factory=dict)  # adapted module -> (in, out) features


def _nf4_bytes(numel: int, double_quant: bool) -> float:
    blocks = numel / 64
    absmax = blocks * 1 + blocks / 256 * 4 if double_quant else blocks * 4
    return numel / 2 + absmax


@functools.lru_cache(maxsize=256)
def param_memory(inputs: PlanInputs, shape: ModelShape, bf16: bool) -> ParamMemory:
    """How the weights are held, and which tensors train. (Cached: what-if questions ask it many times; do not mutate.)"""
    out = ParamMemory()
    params = shape.params()
    targets = lora_target_names(inputs, shape) if inputs.method != "full" else set()
    save_modules = set(inputs.modules_to_save)
    base_bytes = 4 if inputs.method == "full" or not bf16 else 2
    first_trained = shape.num_layers
    layer_sizes: dict[int, int] = {}
    for p in params:
        layer = _layer_index(p.name)
        if layer is not None:
            layer_sizes[layer] = layer_sizes.get(layer, 0) + p.numel
        quantized = inputs.method == "qlora" and p.kind == "linear"
        if quantized and inputs.load_in_8bit:
            out.base += p.numel + p.shape[0] * 4  # int8 + one fp32 scale per output row
            out.quantized_bytes += p.numel + p.shape[0] * 4
        elif quantized:
            out.base += math.ceil(_nf4_bytes(p.numel, inputs.double_quant))
            out.quantized_bytes += math.ceil(_nf4_bytes(p.numel, inputs.double_quant))
            out.largest_dequant = max(out.largest_dequant, p.numel)
        elif inputs.method == "qlora":
            out.base += 4 * p.numel  # peft's k-bit preparation casts the rest to fp32
        else:
            out.base += base_bytes * p.numel
        if inputs.method == "full":
            trains = not inputs.unfrozen_parameters or unfrozen(p.name, inputs.unfrozen_parameters)
            if trains:
                out.trainable.append(p.numel)
                out.trainable_shapes.append(p.shape)
                first_trained = min(first_trained, layer if layer is not None else (0 if p.kind == "embed" else first_trained))
            if p.kind in ("linear", "head") or (p.kind == "embed" and shape.tie_word_embeddings):
                out.matmul_fp32_numel += p.numel
        else:
            first_trained = 0
            if p.kind == "linear" and p.module in targets and p.name.endswith(".weight"):
                out_f, in_f = p.shape
                for numel, shp in ((inputs.lora_r * in_f, (inputs.lora_r, in_f)), (out_f * inputs.lora_r, (out_f, inputs.lora_r))):
                    out.trainable.append(numel)
                    out.trainable_shapes.append(shp)
                    out.adapter += 4 * numel
                if inputs.dora:
                    # peft rebuilds the dense B@A through an in x in identity and adds it to the weight, every forward
                    out.dora_scratch = max(out.dora_scratch, 4 * (in_f * in_f + 2 * in_f * out_f))
                    out.trainable.append(out_f)
                    out.trainable_shapes.append((out_f,))
                    out.adapter += 4 * out_f
                out.adapted[p.module] = (in_f, out_f)
            module_name = p.name.rsplit(".", 1)[0].split(".")[-1]
            if save_modules and (module_name in save_modules or p.name.rsplit(".", 1)[0] in save_modules):
                out.trainable.append(p.numel)
                out.trainable_shapes.append(p.shape)
                out.adapter += 4 * p.numel  # a trainable fp32 copy next to the frozen original
    out.trainable_numel = sum(out.trainable)
    out.layer_numel = max(layer_sizes.values(), default=0)
    out.first_trained_layer = first_trained if inputs.method == "full" else 0
    return out


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def optimizer_state_bytes(inputs: PlanInputs, pm: ParamMemory) -> int:
    """Optimizer states of the trainable tensors, as the configured optimizer allocates them."""
    name, total = inputs.optimizer, 0
    for numel, shp in zip(pm.trainable, pm.trainable_shapes):
        if name in ADAMW:
            total += 8 * numel
        elif name == "adamw_torch_4bit":  # torchao: two 4-bit moments, one fp32 scale per 128 values each
            total += (numel + 2 * 4 * math.ceil(numel / 128)) if numel >= 4096 and numel % 128 == 0 else 8 * numel
        elif name == "adamw_torch_8bit":  # torchao: two 8-bit moments, one fp32 scale per 256 values each
            total += (2 * numel + 2 * 4 * math.ceil(numel / 256)) if numel >= 4096 and numel % 256 == 0 else 8 * numel
        elif name == "muon":  # one momentum buffer per matrix, AdamW's two moments on vectors (the embedding and
            total += 4 * numel if len(shp) == 2 else 8 * numel  # head have AdamW's too: under-counted by 4 bytes a value)
        elif name in ("adamw_bnb_8bit", "paged_adamw_8bit"):
            total += (2 * numel + 2 * 4 * math.ceil(numel / BNB_BLOCK)) if numel >= BNB_8BIT_MIN_SIZE else 8 * numel
        elif name == "lion_8bit":
            total += (numel + 4 * math.ceil(numel / BNB_BLOCK)) if numel >= BNB_8BIT_MIN_SIZE else 4 * numel
        elif name == "lion_32bit":
            total += 4 * numel
        elif name == "sgd":
            total += 4 * numel if inputs.sgd_momentum > 0 else 0
        elif name == "adafactor":  # factored second moment for matrices, no first moment (beta1 unset)
            total += 4 * (shp[0] + shp[1]) if len(shp) >= 2 else 4 * numel
        else:
            total += 8 * numel
    return total


def optimizer_step_scratch(inputs: PlanInputs, pm: ParamMemory, device: Device) -> int:
    """Temporaries of one optimizer step beyond the states (largest tensor's worth)."""
    largest = max(pm.trainable, default=0)
    if inputs.optimizer in ADAMW:
        # CUDA: fused kernel, no temporaries. CPU: torch's per-tensor AdamW builds sqrt(v)/bc + eps.
        return 0 if device.kind != "cpu" else 2 * 4 * largest
    if inputs.optimizer == "adafactor":
        return 3 * 4 * largest
    return 0


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of what one layer saves, for a method and bf16 on/off."""

    autocast: bool
    residual: int  # the residual stream and norm outputs
    proj: int  # q/k/v/gate/up projection outputs
    attn: int  # what SDPA saves (it autocasts to bf16)
    mlp: int  # activation-function and product outputs

    @classmethod
    def of(cls, method: str, bf16: bool) -> "Dtypes":
        half = 2 if bf16 else 4
        if method == "full":
            return cls(bf16, 4, half, half, half)
        if method == "lora":  # the base (and so the stream) is bf16 when bf16 is on
            return cls(bf16, half, half, half, half)
        # QLoRA: bitsandbytes casts 4-bit matmul outputs back to the fp32 stream
        return cls(bf16, 4, 4, half, 4)


def _adapter_inputs(n: int, in_f: int, x_bytes: int, dropout: bool, autocast: bool) -> int:
    """Bytes per token the lora_A matmuls of `n` adapters sharing one input save."""
    if n == 0:
        return 0
    if dropout:  # each adapter draws its own mask and saves its own (bf16 under autocast) input, plus the bool mask
        return n * (in_f * (2 if autocast else x_bytes) + in_f)
    if autocast and x_bytes == 4:  # autocast casts the shared fp32 input once per matmul
        return n * 2 * in_f
    return in_f * x_bytes  # the very same tensor, saved once


def norm_bytes_per_token(inputs: PlanInputs, shape: ModelShape) -> int:
    """RMSNorm saves its fp32 input and 1/rms; a trained norm weight also needs the normalised input (fp32 here)."""
    return 4 * shape.hidden_size + 4 + (4 * shape.hidden_size if inputs.method == "full" else 0)


def layer_activation_bytes(inputs: PlanInputs, shape: ModelShape, bf16: bool, batch: Batch, adapted: dict[str, tuple[int, int]]) -> int:
    """Bytes one decoder layer saves for backward over the micro-batch (no gradient checkpointing)."""
    dt = Dtypes.of(inputs.method, bf16)
    h, i, qd, kvd, r = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim, inputs.lora_r
    full = inputs.method == "full"
    drop = inputs.lora_dropout > 0
    per_token = 0
    per_token += norm_bytes_per_token(inputs, shape) * shape.norms_per_layer

    def linear_inputs(modules: tuple[str, ...], in_f: int, x_bytes: int, saved_already: bool = False) -> int:
        """`saved_already`: the input tensor is saved by another op anyway (SDPA's output feeding o_proj)."""
        casts = dt.autocast and x_bytes == 4
        if full:  # weight gradients need the input: shared unless autocast casts it per matmul
            return len(modules) * 2 * in_f if casts else (0 if saved_already else in_f * x_bytes)
        n = sum(1 for m in modules if m in adapted)
        if inputs.method == "qlora" and dt.autocast:
            x_bytes, casts = 4, True  # peft casts a k-bit layer's adapter input to the fp32 adapter dtype, then autocast to bf16
        shared = n and not drop and not casts and saved_already
        return (0 if shared else _adapter_inputs(n, in_f, x_bytes, drop, dt.autocast)) + n * r * (2 if dt.autocast else 4)

    per_token += linear_inputs(("q_proj", "k_proj", "v_proj"), h, dt.residual)
    per_token += linear_inputs(("gate_proj", "up_proj"), h, dt.residual)
    # SDPA returns its output in (batch, seq, heads, dim) memory, so the o_proj input is the very tensor SDPA saved
    per_token += linear_inputs(("o_proj",), qd, dt.attn, saved_already=not inputs.attn_implementation == "eager")
    per_token += linear_inputs(("down_proj",), i, dt.mlp)
    per_token += 3 * i * dt.mlp if shape.gated_mlp else 2 * i * dt.mlp  # act(gate) input and output, up
    # Attention core
    impl = inputs.attn_implementation
    if impl == "eager":
        per_token += 3 * qd * dt.attn + shape.num_heads * batch.width * (4 + dt.attn)
    elif impl.startswith("flash_attention"):
        per_token += (2 * qd + 2 * kvd) * dt.attn + shape.num_heads * 4
    elif batch.masked:  # SDPA with an explicit mask: K/V repeated to every head, mask saved per layer
        per_token += 4 * qd * dt.attn + shape.num_heads * 4 + batch.width * dt.attn
    else:
        per_token += (2 * qd + 2 * kvd) * dt.attn + shape.num_heads * 4
    if inputs.dora:
        # DoRA scales the base output and the adapter output by the magnitude over the weight norm: both are saved
        per_token += 2 * sum(out_f for _, out_f in adapted.values()) * dt.proj
    return per_token * batch.tokens


def checkpointed_layer_bytes(inputs: PlanInputs, shape: ModelShape, bf16: bool, batch: Batch) -> int:
    """Gradient checkpointing keeps each layer's input hidden states only."""
    return Dtypes.of(inputs.method, bf16).residual * shape.hidden_size * batch.tokens


def backward_scratch_bytes(inputs: PlanInputs, shape: ModelShape, bf16: bool, batch: Batch) -> int:
    """Gradients in flight through one layer during backward (MLP-wide and hidden-wide)."""
    dt = Dtypes.of(inputs.method, bf16)
    return batch.tokens * (2 * shape.intermediate_size * dt.mlp + 3 * shape.hidden_size * 4)


def logits_bytes(inputs: PlanInputs, shape: ModelShape, bf16: bool, batch: Batch) -> int:
    """Loss buffers at their largest (the start of backward): fp32 log-softmax saved, its gradient and the
    gradient of the logits: 12 bytes per (labelled position x vocabulary entry) on lmforge's fast path."""
    v, n = shape.vocab_size, batch.labelled
    total = 12 * n * v
    if shape.model_type not in PLAIN_HEAD_MODELS:  # slow path: logits at every position (soft-capping adds two)
        half = 2 if bf16 else 4
        total += (3 if shape.final_logit_softcapping else 1) * half * batch.tokens * v
    return total


def activation_bytes(inputs: PlanInputs, shape: ModelShape, bf16: bool, batch: Batch, pm: ParamMemory) -> tuple[int, int]:
    """(bytes the forward pass saves, one layer's activations rebuilt by the recompute under checkpointing)."""
    layers = shape.num_layers - pm.first_trained_layer
    per_layer = layer_activation_bytes(inputs, shape, bf16, batch, pm.adapted)
    final_norm = norm_bytes_per_token(inputs, shape) * batch.tokens
    # a trained head saves its input; a trained embedding its token ids
    head_input = (batch.labelled * shape.hidden_size * (2 if bf16 else 4) + 8 * batch.tokens) if inputs.method == "full" else 0
    if inputs.method != "full" and not (inputs.method == "qlora" and inputs.gradient_checkpointing):
        # A frozen embedding's output needs no gradient, so the first layer's norm and the dropout masks in
        # front of its q/k/v adapters are not saved. (k-bit preparation with checkpointing makes it require grad.)
        qkv = sum(1 for m in ("q_proj", "k_proj", "v_proj") if m in pm.adapted)
        per_layer_first = per_layer - (4 * shape.hidden_size + 4 + (qkv * shape.hidden_size if inputs.lora_dropout > 0 else 0)) * batch.tokens
    else:
        per_layer_first = per_layer
    if not inputs.gradient_checkpointing:
        return (layers - 1) * per_layer + per_layer_first + final_norm + head_input, 0
    saved = layers * checkpointed_layer_bytes(inputs, shape, bf16, batch) + final_norm + head_input
    return saved, per_layer


# --------------------------------------------------------------------------- the estimate


def held_bytes(inputs: PlanInputs, bf16: bool) -> int:
    """Bytes per weight lmforge loads the model in (models/setup.py): bf16 under an adapter with bf16 on, else fp32."""
    return 2 if (bf16 and inputs.method != "full") else 4


def converted_all(inputs: PlanInputs, shape: ModelShape, bf16: bool) -> bool:
    """True when loading converts every tensor (so the checkpoint's file mapping is let go afterwards)."""
    return held_bytes(inputs, bf16) != shape.checkpoint_bytes


def resolve_bf16(inputs: PlanInputs, device: Device) -> bool:
    """`bf16: auto` is on where the device runs bf16 natively, as in training (lmforge/device.py)."""
    return device.bf16 if inputs.bf16 == "auto" else bool(inputs.bf16)


def estimate(inputs: PlanInputs, shape: ModelShape, device: Device, batch: Batch | None = None,
             cpu_overhead: "CpuOverhead | None" = None) -> MemoryEstimate:
    """Peak memory per device for training `shape` as `inputs` say, on `device`."""
    batch = batch or Batch.assumed(inputs)
    bf16 = resolve_bf16(inputs, device)
    pm = param_memory(inputs, shape, bf16)
    n = max(1, inputs.num_devices)
    sharding, offload = inputs.sharding, inputs.offload
    notes: list[str] = [f"largest micro-batch: {batch.rows} x {batch.width} tokens, {batch.labelled:,} labelled ({batch.source})"]

    weights, adapter = pm.base, pm.adapter
    grads = 4 * pm.trainable_numel
    states = optimizer_state_bytes(inputs, pm)
    step_scratch = optimizer_step_scratch(inputs, pm, device)
    sharded = sharding in ("zero3", "fsdp")
    # bf16 copies of fp32 matmul weights, alive from forward to backward (full fine-tuning under autocast)
    autocast_copies = 2 * pm.matmul_fp32_numel if (bf16 and inputs.method == "full" and not sharded) else 0
    autocast_copies += 2 * sum(pm.trainable) if (bf16 and inputs.method != "full") else 0
    workspace = 2 * pm.largest_dequant + pm.dora_scratch  # a 4-bit weight dequantized for one matmul; DoRA's dense B@A
    comm = 0
    host = 0
    if sharding == "ddp" and n > 1:
        comm = grads  # DDP's gradient buckets: a second copy of the gradients
    if sharding in ("zero1", "zero2", "zero3", "fsdp"):
        states = math.ceil(states / n)
    if sharding in ("zero2", "zero3", "fsdp"):
        grads = math.ceil(grads / n)
        comm = 2 * 4 * min(pm.layer_numel, pm.trainable_numel)  # one layer's unsharded gradients, reduce-scatter buffer
    if sharded:
        weights = math.ceil(weights / n)
        adapter = math.ceil(adapter / n)
        gathered = 2 * pm.layer_numel * (2 if bf16 else 4)  # this layer and the prefetched next, unsharded
        workspace += gathered
    if offload == "optimizer":
        host += states
        states = 0
        step_scratch = 0
        if inputs.method == "full":  # the fp32 master copy lives with the optimizer; the device keeps compute-dtype weights
            host += weights
            weights = weights // 2 if bf16 else weights
            autocast_copies = 0
    elif offload == "params":
        host += weights + adapter + grads + states
        weights, adapter, grads, states, step_scratch, autocast_copies = 0, 0, 0, 0, 0, 0
        workspace += 2 * pm.layer_numel * (2 if bf16 else 4) if not sharded else 0

    if shape.vision is not None:
        # The vision tower and projector: frozen weights in the held dtype (trained ones are in the language model's
        # count only if unfrozen_parameters asks, which the planner does not model), run without saved activations;
        # each row's pixel tensor beside its tokens (one image per row assumed). The image tokens themselves are in
        # the batch's width already (the prepared examples hold them expanded).
        vision_weights = shape.vision.parameters * (2 if (bf16 and inputs.method != "full") else 4)
        weights += vision_weights
        pixels = shape.vision.pixel_bytes(batch.rows)
        workspace += pixels
        notes.append(f"{shape.vision.describe()}: {vision_weights / GiB:.2f} GiB of frozen weights, pixel tensors "
                     f"{pixels / 2**20:.1f} MiB per micro-batch ({batch.rows} images)")
    saved, recompute = activation_bytes(inputs, shape, bf16, batch, pm)
    logits = logits_bytes(inputs, shape, bf16, batch)
    backward_scratch = backward_scratch_bytes(inputs, shape, bf16, batch)
    if inputs.gradient_checkpointing and autocast_copies and inputs.method == "full":
        # Checkpointed layers save nothing, so their bf16 weight copies die with the forward's autocast cache and
        # come back one layer at a time in the recompute; only the head's copy stays.
        head_copy = 2 * shape.vocab_size * shape.hidden_size
        recompute += 2 * pm.layer_numel
        autocast_copies = head_copy
    # With gradient accumulation the gradients of earlier micro-batches are alive throughout; otherwise backward
    # starts with the head's (full fine-tuning) and ends with all of them.
    accumulated = grads if inputs.gradient_accumulation_steps > 1 else 0
    head_grad = min(grads, 4 * shape.vocab_size * shape.hidden_size) if inputs.method == "full" else 0

    # Backward walks the layers top-down, freeing each layer's activations (and weight copies) and allocating its
    # gradients: linear in the layer index, so the peak is at one end of the walk.
    in_phases = {
        "backward start": dict(gradients=max(accumulated, head_grad), activations=saved, logits_and_loss=logits,
                               autocast_weight_copies=autocast_copies, workspace=workspace),
        "backward end": dict(gradients=grads, activations=recompute, workspace=workspace + backward_scratch),
        "optimizer step": dict(gradients=grads, workspace=step_scratch),
    }
    breakdowns = {name: {"weights": weights, "adapter": adapter, "optimizer_states": states, **parts}
                  for name, parts in in_phases.items()}
    if inputs.reference_copy:  # rl: the frozen reference model, held all run
        for parts in breakdowns.values():
            parts["reference_model"] = pm.base
    for parts in breakdowns.values():
        parts["workspace"] = parts.get("workspace", 0) + comm
    if device.kind == "cpu":
        overhead_model = cpu_overhead or CpuOverhead()
        # glibc keeps freed heap pages: the high-water mark grows with the step's short-lived memory (activations
        # and loss buffers). Full fine-tuning frees all gradients right before each forward, and those
        # weight-sized blocks get reused by the activations.
        # Checkpointing or not, every layer's activations are allocated once per step (forward or recompute).
        volume = (activation_bytes(inputs.with_(gradient_checkpointing=False), shape, bf16, batch, pm)[0]
                  if inputs.gradient_checkpointing else saved) + logits
        retained = overhead_model.bytes_for(volume, grads if inputs.method == "full" else 0)
        if inputs.method == "qlora" and not converted_all(inputs, shape, bf16):
            # Tensors kept in the file's dtype are views of the checkpoint's mapping, so the pages the
            # quantization read stay resident with it: the whole file counts, next to the 4-bit copies.
            for parts in breakdowns.values():
                parts["checkpoint_pages"] = shape.checkpoint_bytes * shape.parameter_count() - (weights - pm.quantized_bytes)
        for parts in breakdowns.values():
            parts["framework_overhead"] = retained
        # Loading: the checkpoint's safetensors pages are resident while each tensor is converted (a dtype change
        # or quantization); weights kept in the file's dtype are the mapped pages themselves (no copy).
        file_bytes = shape.checkpoint_bytes * shape.parameter_count()
        converted = inputs.method == "qlora" or held_bytes(inputs, bf16) != shape.checkpoint_bytes
        breakdowns["loading the weights"] = {"weights": pm.base if converted else file_bytes,
                                             "checkpoint_pages": file_bytes if converted else 0,
                                             "framework_overhead": overhead_model.fixed}
    else:
        for parts in breakdowns.values():
            parts["framework_overhead"] = CUDA_CONTEXT_BYTES + int(GPU_ALLOCATOR_SLACK * sum(parts.values()))
    totals = {name: sum(parts.values()) for name, parts in breakdowns.items()}
    phase = max(totals, key=totals.__getitem__)
    keys = ("weights", *(("reference_model",) if inputs.reference_copy else ()), "adapter", "gradients", "optimizer_states", "activations", "logits_and_loss",
            "autocast_weight_copies", "workspace", "checkpoint_pages", "framework_overhead")
    breakdown = {k: breakdowns[phase].get(k, 0) for k in keys}
    peak = totals[phase]
    live = peak - breakdown["framework_overhead"]
    if sharding != "none" and n > 1:
        notes.append(f"{sharding} over {n} devices (per-device numbers)")
    if offload != "none":
        notes.append(f"{offload} offloaded to CPU: {host / GiB:.1f} GiB of host RAM")
    return MemoryEstimate(device.name, bf16, peak, phase, breakdown, host, live, notes)


@dataclass(frozen=True)
class CpuOverhead:
    """What a CPU run's resident memory holds beyond the live tensors, relative to the process after its imports.

    ``fixed``: the tokenizer, the prepared data and Python objects a run creates before its first
    step (measured: ~70 MiB for SmolLM2 on GSM8K). ``retained``: glibc's allocator keeps freed heap
    pages; the step's short-lived tensors (activations, loss buffers) are allocated among long-lived
    ones, so the heap's high-water mark exceeds the live peak by about this share of them, less the
    gradient blocks full fine-tuning frees before every forward (the activations reuse those).
    Fitted with bench/plan_memory.py on this project's 2-core CPU (see bench/RESULTS.md).
    """

    fixed: int = 70 * 2**20
    retained: float = 0.72

    def bytes_for(self, transient: int, recyclable: int = 0) -> int:
        return self.fixed + int(self.retained * max(0, transient - recyclable))
