"""GRPO's generation step: completions sampled with the current weights, scored, and cut into micro-batches.

The loop draws micro-batches from a :class:`RolloutStream` as from any stream. When the last generation is used
up (after num_iterations passes), the stream takes the next prompts (one step's worth: micro_batch_size x
gradient_accumulation_steps completions, num_generations per prompt), samples their completions in one batch
through lmforge.infer.generate's Generator (transformers' generate, KV cache, left-padded rows), scores them
with the reward functions (lmforge.train.rewards), normalises the rewards within each prompt's group into
advantages (TRL's ``_generate_and_score_completions``), and adds what the loss needs beside: the reference
model's log-probabilities (beta > 0) and the sampling policy's (num_iterations > 1).

Resume is bit-identical: the prompt order is a pure function of (seed, epoch), and each completion samples from
its own generator seeded by (seed, generation number, the completion's place in the step over all ranks)
(:class:`RowSampler`), so the sampling draws are a function of the position, the training RNG is left alone,
and two ranks sample the very completions one process with the same global batch samples (the same per-step loss). A checkpoint taken between the passes of
one generation (num_iterations > 1) stores that generation's micro-batches in its position.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import replace
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lmforge.data.batching import Batch
from lmforge.data.prompt_sets import Prompt
from lmforge.infer.generate import Generator, Sampling
from lmforge.train.grpo import MetricSums, completion_logps, contiguous_head_input
from lmforge.train.rewards import RewardFunction, score

BUFFER_FIELDS = ("input_ids", "attention_mask", "completion_mask", "advantages", "old_logps", "ref_logps")


def nanstd(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaN (TRL's nanstd)."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(values)).sum()
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1).clamp(min=1)
    std = variance.sqrt()
    return std if keepdim or dim is None else std.squeeze(dim)


def group_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, group: int, scale: str,
                     aggregation: str = "sum_then_normalize") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, weighted rewards, whether each completion's group had zero reward std), as TRL computes them.

    sum_then_normalize: weighted sum of the rewards, minus its group mean, divided by the group's std (scale
    "group"), the whole batch's ("batch") or not ("none"), + 1e-4. normalize_then_sum: each reward normalised
    within its group first, then weighted, summed and normalised over the batch. A completion no function scored
    (all NaN) gets advantage 0.
    """
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, group, rewards_per_func.shape[1])
        normalised = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
        rewards = (normalised.view(-1, rewards_per_func.shape[1]) * weights).nansum(dim=1)
        rewards[unscorable] = torch.nan
        std = nanstd(rewards).expand_as(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std + 1e-4)
    else:
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[unscorable] = torch.nan
        mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group)
        std = (nanstd(rewards).expand_as(rewards) if scale == "batch"
               else nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group))
        advantages = rewards - mean
        if scale != "none":
            advantages = advantages / (std + 1e-4)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), rewards, zero_std


def completion_masks(completions: torch.Tensor, stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of each completion's tokens up to and including its first stop token, whether it never stopped)."""
    is_stop = torch.isin(completions, torch.tensor(list(stop_ids), dtype=completions.dtype))
    stopped = is_stop.any(dim=1)
    first = torch.where(stopped, is_stop.int().argmax(dim=1), torch.full_like(stopped, completions.shape[1], dtype=torch.long))
    positions = torch.arange(completions.shape[1]).expand_as(completions)
    return (positions <= first.unsqueeze(1)).long(), ~stopped


def generation_seed(seed: int, generation: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, generation, rank, 0x6770]).generate_state(1)[0])


def row_seed(seed: int, generation: int, row: int) -> int:
    """The seed of one completion: its generation and its place among the step's completions over all ranks."""
    return int(np.random.SeedSequence([seed, generation, row, 0x726F77]).generate_state(1)[0])


class RowSampler:
    """Sampling in which each row draws from its own seeded stream (a transformers logits processor, for a greedy
    ``generate``): the temperature / top-k / top-p warped log-probabilities plus Gumbel noise, whose argmax is a
    draw from the warped distribution (the Gumbel-max trick). A row's tokens so depend on its seed alone, not on
    which other rows share its batch: the completions are the same whether one process or several ranks sample them."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int, top_p: float) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.warpers: list[Any] = [TemperatureLogitsWarper(temperature)]
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        noise = torch.stack([torch.empty(scores.shape[1]).exponential_(generator=g) for g in self.generators])
        return scores.float().log_softmax(-1) - noise.to(scores.device).log()  # + Gumbel(0, 1) = -log Exp(1)


def shared_prefill(model: Any) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """For Generator.generate_ids: the KV cache of every prompt column but the last, run once per distinct prompt and
    gathered out to its rows (None where no prompt repeats: generate prefills as usual).

    A step's rows are num_generations copies of each prompt, so generate's prefill ran each prompt that many times;
    causal attention makes the copies' keys and values equal. Positions as generate numbers them (left padding).
    """

    def prefill(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        prefix = input_ids.shape[1] - 1
        if prefix < 1:
            return None
        key = torch.cat([input_ids[:, :prefix], attention_mask[:, :prefix]], dim=1)
        distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
        if distinct.shape[0] == input_ids.shape[0]:
            return None
        rows = torch.arange(input_ids.shape[0], device=inverse.device)
        first = torch.full_like(rows[: distinct.shape[0]], input_ids.shape[0]).scatter_reduce(0, inverse, rows, "amin")
        ids, mask = input_ids[first, :prefix], attention_mask[first, :prefix]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate numbers them
        cache = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1).cache
        if cache is None or not hasattr(cache, "batch_select_indices") or cache.get_seq_length() != prefix:
            return None
        cache.batch_select_indices(inverse)
        return cache

    return prefill


@contextlib.contextmanager
def adapter_cast_once(model: Any) -> Iterator[None]:
    """Inside autocast, the LoRA A/B weights held in the autocast dtype for the duration (restored on leaving).

    Sampling runs under inference mode, where autocast caches no weight casts: every decode step cast each of the
    fp32 adapter's A and B weights to bf16 again (13,440 casts for 32 tokens of SmolLM2-135M), and peft cast
    each input up to fp32 to match them. Autocast's cast and ``.to`` round alike, so the matmuls see the very same
    bf16 values: the sampled tokens do not change. Left alone: DoRA (its norms read the weights in fp32) and
    weights that are not plain tensors (sharded).
    """
    device = getattr(model, "device", torch.device("cpu"))
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    names = [name for name, _ in model.named_parameters()]
    if dtype is None or any("lora_magnitude_vector" in n for n in names):
        yield
        return
    swapped = []
    for name, p in model.named_parameters():
        if ((".lora_A." in name or ".lora_B." in name) and p.dtype == torch.float32 and type(p.data) is torch.Tensor
                and not hasattr(p, "ds_id")):  # (a ZeRO-3 parameter's data is a placeholder between gathers)
            swapped.append((p, p.data))
            p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in swapped:
            p.data = data


class RolloutStream:
    """Micro-batches of scored completions, generated when needed; position: prompts consumed and generations made."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[Prompt],
        rewards: Sequence[RewardFunction],
        trl: Any,
        *,
        micro_batch_size: int,
        grad_accum: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        reference: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,  # yields the reference model
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        say: Callable[[str], None] = print,
        call: Callable[..., Any] | None = None,  # runs fn(model) where the model can (a sharded model: inside its root)
        lockstep: bool = False,  # a sharded model: every rank generates and scores at once (each forward a collective)
        share_prompts: bool = False,  # one process: each prompt prefilled once per group (shared_prefill, completion_logps)
    ) -> None:
        self.model, self.tokenizer, self.prompts, self.rewards, self.trl = model, tokenizer, list(prompts), list(rewards), trl
        self.micro_batch_size, self.grad_accum, self.seed = micro_batch_size, grad_accum, seed
        self.rank, self.world_size = rank, world_size
        self.group = trl.num_generations
        self.prompts_per_rank = micro_batch_size * grad_accum // self.group
        self.reference = reference  # beta > 0: a context that yields the reference model (reference_model below)
        self.autocast, self.say = autocast, say
        self.call: Callable[..., Any] = call or (lambda model, fn, *args: fn(model, *args))
        self.lockstep = lockstep
        self.share_prompts = share_prompts
        self.weights = torch.tensor(trl.reward_weights or [1.0] * len(self.rewards), dtype=torch.float32)
        self.scale = {True: "group", False: "none"}.get(trl.scale_rewards, trl.scale_rewards)  # type: ignore[arg-type]
        self.generator = Generator(model, tokenizer, None)
        self.sampling = Sampling(max_new_tokens=trl.max_completion_length, temperature=trl.temperature, top_p=trl.top_p,
                                 top_k=trl.top_k, repetition_penalty=trl.repetition_penalty)
        self.epoch, self.consumed, self.generations = 0, 0, 0  # prompts consumed in the epoch, over all ranks
        self.passes = 0  # passes over the current generation's micro-batches (num_iterations per generation)
        self.buffer: list[Batch] | None = None
        self.metrics = MetricSums()
        self.generation_seconds = 0.0  # all generations, this run (summary.json)
        self.window_generation = 0.0  # since the last drain (the log's generation/training split)
        self.window_start = time.perf_counter()
        self.samples: list[tuple[str, str, list[float]]] = []

    # -- position ------------------------------------------------------------------------------------

    def position(self) -> dict[str, Any]:
        position: dict[str, Any] = {"epoch": self.epoch, "prompts_consumed": self.consumed, "generations": self.generations,
                                    "passes": self.passes}
        if self.buffer is not None and 0 < self.passes < self.trl.num_iterations:
            position["buffer"] = [{k: v.tolist() for k, v in b.items()} for b in self.buffer]
        return position

    def restore(self, position: dict[str, Any]) -> None:
        self.epoch, self.consumed = position["epoch"], position["prompts_consumed"]
        self.generations, self.passes = position["generations"], position["passes"]
        if "buffer" in position:
            self.buffer = [{k: torch.tensor(v, dtype=torch.float32 if k in ("advantages", "old_logps", "ref_logps") else torch.long)
                            for k, v in b.items()} for b in position["buffer"]]
        else:
            self.buffer, self.passes = None, 0

    # -- micro-batches --------------------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))

    def _next_prompts(self) -> list[Prompt]:
        """This rank's share of the next step's prompts; every rank advances by the global count."""
        wanted = self.prompts_per_rank * self.world_size
        if wanted > len(self.prompts):
            from lmforge.errors import LmforgeError

            raise LmforgeError(f"a step takes {wanted} prompts and the data holds {len(self.prompts)}", where="datasets",
                               fix="add prompts, or lower micro_batch_size x gradient_accumulation_steps / num_generations")
        if self.consumed + wanted > len(self.prompts):  # the epoch's remainder is dropped, as a last partial batch would be
            self.epoch, self.consumed = self.epoch + 1, 0
        order = self._order(self.epoch)[self.consumed:self.consumed + wanted]
        self.consumed += wanted
        mine = order[self.rank * self.prompts_per_rank:(self.rank + 1) * self.prompts_per_rank]
        return [self.prompts[int(i)] for i in mine]

    def __iter__(self) -> Iterator[Batch]:
        self.window_start = time.perf_counter()  # the first log's training time starts with training, not setup
        while True:
            if self.buffer is None or self.passes >= self.trl.num_iterations:
                self.buffer = self._generate(self._next_prompts())
                self.passes = 0
            for index, batch in enumerate(self.buffer):
                if index + 1 == len(self.buffer):
                    self.passes += 1  # counted before the last micro-batch is handed out: exact at the step boundary
                yield batch

    # -- generation -----------------------------------------------------------------------------------

    def _sample(self, rows: list[list[int]], sampling: Sampling, seed: int, row_seeds: Sequence[int] | None = None) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        devices = [self.model.device.index or 0] if self.model.device.type == "cuda" else []
        processor = None
        if row_seeds is not None and sampling.temperature > 0:  # each row its own stream: generate picks the argmax
            processor = [RowSampler(row_seeds, sampling.temperature, sampling.top_k, sampling.top_p)]
            sampling = replace(sampling, temperature=0.0)
        try:
            with torch.random.fork_rng(devices=devices), self.autocast(), self.generator.lock, contiguous_head_input(self.model):
                torch.manual_seed(seed)
                single = self.share_prompts and not self.lockstep  # one process: the model's weights are all here
                prefill = shared_prefill(self.model) if single else None
                with adapter_cast_once(self.model) if single else contextlib.nullcontext():
                    return self.call(self.model, lambda _model: self.generator.generate_ids(
                        rows, sampling, synced_gpus=self.lockstep, logits_processor=processor, prefill=prefill))
        finally:
            self.model.train(was_training)

    def _score(self, prompts: list[Prompt], completions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
        """(rewards [completions, functions], completion mask, texts, truncated) of completions of `prompts` (in order)."""
        stop_ids = self.generator.stop_token_ids
        mask, truncated = completion_masks(completions, stop_ids)
        kept = [row[: int(m.sum())] for row, m in zip(completions.tolist(), mask)]
        texts = [self.tokenizer.decode([t for t in row if t not in stop_ids], skip_special_tokens=True) for row in kept]
        values = [p.value for p in prompts]
        shown = [[{"role": "assistant", "content": t}] if not isinstance(v, str) else t for t, v in zip(texts, values)]
        columns = {name: [p.columns.get(name) for p in prompts] for name in prompts[0].columns}
        rewards = score(self.rewards, values, shown, kept, columns)
        return rewards, mask, texts, truncated

    def _generate(self, prompts: list[Prompt]) -> list[Batch]:
        started = time.perf_counter()
        group = self.group
        repeated = [p for p in prompts for _ in range(group)]  # each prompt's group is consecutive, as in TRL
        first = self.rank * len(repeated)  # this rank's first completion among the step's, over all ranks
        completions = self._sample([list(p.ids) for p in repeated], self.sampling,
                                   generation_seed(self.seed, self.generations, self.rank),
                                   [row_seed(self.seed, self.generations, first + i) for i in range(len(repeated))])
        self.generations += 1
        rewards_per_func, mask, texts, truncated = self._score(repeated, completions)
        advantages, rewards, zero_std = group_advantages(rewards_per_func, self.weights, group, self.scale,
                                                         self.trl.multi_objective_aggregation)
        if self.trl.mask_truncated_completions:
            mask = mask * (~truncated).long().unsqueeze(1)
        lengths = mask.sum(dim=1).float()
        self._record(rewards_per_func, rewards, zero_std, lengths, truncated)
        if self.trl.log_completions:
            self.samples = [(repeated[i].value if isinstance(repeated[i].value, str) else repeated[i].value[-1]["content"],
                             texts[i], rewards_per_func[i].tolist()) for i in range(len(texts))]
        batches = []
        for start in range(0, len(repeated), self.micro_batch_size):
            part = slice(start, start + self.micro_batch_size)
            batches.append(self._micro_batch(repeated[part], completions[part], mask[part], advantages[part]))
        elapsed = time.perf_counter() - started
        self.generation_seconds += elapsed
        self.window_generation += elapsed
        return batches

    def _micro_batch(self, prompts: list[Prompt], completions: torch.Tensor, mask: torch.Tensor,
                     advantages: torch.Tensor) -> Batch:
        """Left-padded prompts joined to right-padded completions (trimmed to the longest), with what the loss reads."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.generator.stop_token_ids[0]
        width = max(int(mask.sum(dim=1).max()), 1)
        prompt_width = max(len(p.ids) for p in prompts)
        prompt_ids = torch.tensor([[pad] * (prompt_width - len(p.ids)) + list(p.ids) for p in prompts], dtype=torch.long)
        prompt_mask = torch.tensor([[0] * (prompt_width - len(p.ids)) + [1] * len(p.ids) for p in prompts], dtype=torch.long)
        completion_ids = completions[:, :width].clone()
        completion_mask = mask[:, :width]
        completion_ids[completion_mask == 0] = pad
        batch: Batch = {
            "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
            "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
            "completion_mask": completion_mask,
            "advantages": advantages.float(),
        }
        if self.trl.num_iterations > 1:  # the sampling policy's log-probabilities, for the ratio in later passes
            batch["old_logps"] = self._logps(batch, width)
        if self.trl.beta != 0.0:
            assert self.reference is not None
            with self.reference() as reference:
                batch["ref_logps"] = self._logps(batch, width, reference)
        return batch

    @torch.no_grad()
    def _logps(self, batch: Batch, width: int, model: Any = None) -> torch.Tensor:
        model = self.model if model is None else model
        was_training = self.model.training
        self.model.eval()
        device = self.model.device
        try:
            with self.autocast():
                return self.call(self.model, lambda _model: completion_logps(
                    model, batch["input_ids"].to(device), batch["attention_mask"].to(device), width, self.trl.temperature,
                    self.share_prompts)).float().cpu()
        finally:
            self.model.train(was_training)

    # -- metrics ----------------------------------------------------------------------------------------

    def _record(self, per_func: torch.Tensor, rewards: torch.Tensor, zero_std: torch.Tensor, lengths: torch.Tensor,
                truncated: torch.Tensor) -> None:
        m = self.metrics
        for j, reward in enumerate(self.rewards):
            column = per_func[:, j]
            m.add(f"rewards/{reward.name}/mean", float(torch.nanmean(column)), 1.0)
            m.add(f"rewards/{reward.name}/std", float(nanstd(column)), 1.0)
        m.add("reward", float(torch.nanmean(rewards)), 1.0)
        m.add("reward_std", float(nanstd(rewards)), 1.0)
        m.add("frac_reward_zero_std", float(zero_std.float().mean()), 1.0)
        m.add("completions/mean_length", float(lengths.mean()), 1.0)
        m.add("completions/min_length", float(lengths.min()), 1.0)
        m.add("completions/max_length", float(lengths.max()), 1.0)
        m.add("completions/clipped_ratio", float(truncated.float().mean()), 1.0)

    def drain(self, sum_over_ranks: Callable[[list[float]], list[float]] | None = None) -> dict[str, float]:
        """The window's generation metrics (means over its generations; with `sum_over_ranks`, over every rank's:
        reward means are then the global means, stds the mean of the ranks' group stds) and this rank's generation /
        training time split."""
        now = time.perf_counter()
        out = self.metrics.drain(sum_over_ranks)
        out["generation_seconds"] = self.window_generation
        out["training_seconds"] = max(now - self.window_start - self.window_generation, 0.0)
        self.window_generation, self.window_start = 0.0, now
        for prompt, completion, rewards in self.samples[: self.trl.num_completions_to_print or 1]:
            shown = ", ".join(f"{r.name} {v:g}" for r, v in zip(self.rewards, rewards))
            self.say(f"completion ({shown}): {prompt[-80:]!r} → {completion[:200]!r}")
        self.samples = []
        return out

    # -- held-out rewards ---------------------------------------------------------------------------------

    def evaluate(self, prompts: Sequence[Prompt], batch_size: int) -> dict[str, float]:
        """Mean reward (weighted sum, and per function) of one greedy completion per held-out prompt."""
        greedy = Sampling(max_new_tokens=self.trl.max_completion_length, temperature=0.0)
        tables = []
        for start in range(0, len(prompts), batch_size):
            part = list(prompts[start:start + batch_size])
            completions = self._sample([list(p.ids) for p in part], greedy, self.seed)
            tables.append(self._score(part, completions)[0])
        table = torch.cat(tables)
        weighted = (table * self.weights).nansum(dim=1)
        out = {"eval_reward": float(weighted.mean())}
        for j, reward in enumerate(self.rewards):
            value = float(torch.nanmean(table[:, j]))
            out[f"eval_rewards/{reward.name}/mean"] = value if not math.isnan(value) else 0.0
        return out


def reference_model(model: Any) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The KL term's reference, without a second copy where one can be avoided: a LoRA/QLoRA model with its adapter
    disabled (the base it started from), else a frozen copy of the starting weights (full fine-tuning).

    GRPO's own minimal version; the DPO family's reference handling may replace it.
    """
    if hasattr(model, "disable_adapter") and getattr(model, "peft_config", None):
        @contextlib.contextmanager
        def adapter_disabled() -> Iterator[Any]:
            with model.disable_adapter():
                yield model
        return adapter_disabled
    import copy

    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return lambda: contextlib.nullcontext(frozen)
