"""LISA (Layerwise Importance Sampled AdamW, arXiv 2403.17919): train a few decoder layers at a time.

Every ``lisa_step_interval`` steps, ``lisa_n_layers`` decoder layers are drawn at random to train; the others are
frozen until the next draw. Everything outside the layer list (embeddings, output head, final norm) trains
throughout, as in the paper and axolotl's callback. A frozen layer gets no gradient, so the optimizer leaves its
weights (and its moment estimates) as they are until it is drawn again.

The draw for steps ``[k * interval, (k + 1) * interval)`` comes from a generator seeded with ``(seed, k)`` alone,
so the random state is a function of the step a checkpoint stores: a run resumed mid-interval trains the same layers
as the uninterrupted one, bit for bit, with nothing else to save (and the seed is a resume invariant).
(axolotl draws from numpy's global generator, which its checkpoints do not restore.)
"""

from __future__ import annotations

from functools import reduce
from typing import Any

import torch

from lmforge.errors import LmforgeError


def layer_list(model: Any, attribute: str) -> torch.nn.ModuleList:
    """The decoder layers at `attribute` (model.layers), looked up on the model or inside its PEFT / DDP wrappers."""
    candidates = [model]
    for unwrap in ("module", "get_base_model"):
        inner = candidates[-1]
        inner = getattr(inner, unwrap, None)
        if inner is not None:
            candidates.append(inner() if callable(inner) and unwrap == "get_base_model" else inner)
    for candidate in candidates:
        try:
            layers = reduce(getattr, attribute.split("."), candidate)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise LmforgeError(f"lisa_layers_attribute: {attribute} is not a list of layers in {type(model).__name__}",
                       where="lisa_layers_attribute", fix="name the decoder-layer list, e.g. model.layers (Llama, Qwen, "
                       "Mistral) or transformer.h (GPT-2)")


class LayerSampler:
    """Freezes all but `n_layers` of the decoder layers, redrawn every `interval` steps (call :meth:`at_step` first
    thing in each step)."""

    def __init__(self, model: Any, n_layers: int, interval: int, attribute: str, seed: int) -> None:
        layers = layer_list(model, attribute)
        n_layers = min(n_layers, len(layers))  # as many as the model has: every layer trains (the recipe says so)
        # The weights each layer trains when drawn: those trainable now (all of them, or an adapter's, or those
        # unfrozen_parameters names), so LISA never unfreezes what the config froze.
        self.trainable = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
        self.n_layers, self.interval, self.seed = n_layers, interval, seed
        self.draw_index: int | None = None
        self.active: list[int] = []

    def draw(self, index: int) -> list[int]:
        """The layers trained in the `index`-th interval (depends only on the seed and the index)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return sorted(torch.randperm(len(self.trainable), generator=generator)[: self.n_layers].tolist())

    def release(self) -> None:
        """After training: every layer's weights trainable again, as before LISA (the summary counts them)."""
        for params in self.trainable:
            for param in params:
                param.requires_grad_(True)
        self.draw_index, self.active = None, []

    def at_step(self, step: int) -> None:
        """Before 0-based `step`: set which layers train (a new draw at each interval's first step, or after a resume)."""
        index = step // self.interval
        if index == self.draw_index:
            return
        self.draw_index, self.active = index, self.draw(index)
        chosen = set(self.active)
        for i, params in enumerate(self.trainable):
            for param in params:
                param.requires_grad_(i in chosen)
