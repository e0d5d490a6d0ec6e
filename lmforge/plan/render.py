"""`lmforge plan`'s answer: one dict (what --json prints) and its text rendering.

Memory is in GiB (2^30 bytes, the unit GPU memory is sold in); the JSON fields ending in `_gb` are GiB too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lmforge.config import LmforgeConfig
from lmforge.plan.advice import MAX_DEVICES, devices_needed, path_to_fit, rank_changes
from lmforge.plan.hardware import GPUS, GiB, Device, cpu_device, find_gpu
from lmforge.plan.inputs import PlanInputs
from lmforge.plan.measure import Measurement
from lmforge.plan.memory import MemoryEstimate, lora_target_names, param_memory, resolve_bf16
from lmforge.plan.predict import RunPlan, predict_run
from lmforge.plan.throughput import DEFAULT_CPU_MFU, DEFAULT_GPU_MFU, Prices, flops_per_token, hours, load_prices, run_length

REFERENCE_GPU = "A100 80GB"  # what advice targets when no --gpu is given and nothing fits
# From 1B parameters (or a CPU peak above this machine's RAM) a run is a GPU job: the question is which card and how
# many, so the report opens with the per-GPU peak and the fewest devices that fit, and this CPU comes after.
GPU_CLASS_PARAMETERS = 1_000_000_000


@dataclass
class PlanOptions:
    gpu: str | None = None
    num_gpus: int | None = None
    strategy: str | None = None
    offload: str | None = None
    prices: str | None = None
    mfu: float | None = None
    use_data: bool = True


def gb(n: float) -> float:
    return round(n / GiB, 3)


def _inputs_dict(inputs: PlanInputs, plan: RunPlan) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(inputs, k) for k in (
        "method", "optimizer", "sequence_len", "micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
        "sample_packing", "attn_implementation", "sharding", "num_devices", "offload")}
    out["bf16"] = inputs.bf16
    if inputs.method != "full":
        out.update(lora_r=inputs.lora_r, lora_dropout=inputs.lora_dropout, dora=inputs.dora,
                   lora_targets=sorted(lora_target_names(inputs, plan.shape)))
    if inputs.method == "qlora":
        out.update(quantization="int8" if inputs.load_in_8bit else "nf4", double_quant=inputs.double_quant)
    return out


def _estimate_dict(est: MemoryEstimate) -> dict[str, Any]:
    return {"peak_gb": gb(est.peak_bytes), "phase": est.phase, "bf16": est.bf16,
            "breakdown": {k: gb(v) for k, v in est.breakdown.items()}, "host_gb": gb(est.host_bytes),
            "live_peak_gb": gb(est.live_peak_bytes)}


def _time(plan: RunPlan, inputs: PlanInputs, device: Device, bf16: bool, mfu_real: float | None, count: int) -> dict[str, Any] | None:
    """Hours for the run on `count` devices; mfu_real: a measured MFU over real tokens, else the device default."""
    length = run_length(inputs, plan.data)
    if length is None:
        return None
    width = plan.data.mean_row_len if plan.data else inputs.sequence_len
    labelled_share = plan.data.labelled / max(plan.data.tokens, 1) if plan.data else 1.0
    per_token = flops_per_token(inputs, plan.shape, width, labelled_share)
    if mfu_real is not None:
        total, mfu, basis = per_token * length.real_tokens, mfu_real, "measured"
    else:  # the default MFU is over computed tokens: padding is work too
        total, mfu = per_token * length.computed_tokens, (DEFAULT_CPU_MFU if device.kind == "cpu" else DEFAULT_GPU_MFU)
        basis = "assumed"
    h = hours(total, device, bf16, mfu, count)
    return {"hours": None if math.isnan(h) else round(h, 6), "mfu": mfu, "mfu_basis": basis,
            "flops_per_token": per_token, "tokens_per_s": None if math.isnan(h) else round(length.real_tokens / (h * 3600), 1)}


def build_report(cfg: LmforgeConfig, options: PlanOptions, measurement: Measurement | None = None,
                 cpu_ceiling: dict[str, float] | None = None) -> dict[str, Any]:
    """Everything `lmforge plan` says, as one JSON-ready dict."""
    inputs = PlanInputs.from_config(cfg, num_devices=options.num_gpus, sharding=options.strategy, offload=options.offload)
    cpu = cpu_device(cpu_ceiling)
    plan = predict_run(cfg, device=cpu, inputs=inputs, use_data=options.use_data)
    prices: Prices | None = load_prices(options.prices)

    def estimator(changed: PlanInputs, device: Device) -> MemoryEstimate:
        return plan.on(device, changed)

    length = run_length(inputs, plan.data)
    gpus = []
    for device in GPUS:
        est = estimator(inputs, device)
        bf16 = resolve_bf16(inputs, device)
        need = devices_needed(inputs, device, estimator)
        count = need[0] if need else None
        timing = _time(plan, inputs if not need or need[1] == inputs.sharding else inputs.with_(sharding=need[1], num_devices=count),
                       device, bf16, options.mfu, count or 1) if need else None
        price = prices.for_gpu(device) if prices else None
        cost = round(price * timing["hours"] * count, 4) if (price is not None and timing and timing["hours"] is not None) else None
        gpus.append({"gpu": device.name, "memory_gb": device.memory_gib, "peak_gb": gb(est.peak_bytes), "bf16": bf16,
                     "fits": est.peak_bytes <= device.memory_bytes, "count": count,
                     "count_strategy": need[1] if need else None, "count_peak_gb": gb(need[2].peak_bytes) if need else None,
                     "hours": timing and timing["hours"],
                     "tokens_per_s": timing and timing["tokens_per_s"], "price_per_hour": price, "cost": cost})
    target = find_gpu(options.gpu) if options.gpu else None
    gpu_job = target is not None or plan.shape.parameter_count() >= GPU_CLASS_PARAMETERS or (
        0 < cpu.memory_bytes < plan.memory.peak_bytes)
    headline_row = _headline_row(gpus, target) if gpu_job else None
    shown = target or (find_gpu(headline_row["gpu"]) if headline_row else None)  # the device the memory block is about
    main = estimator(inputs, shown) if shown else plan.memory
    cpu_bf16 = resolve_bf16(inputs, cpu)
    if measurement:
        width = plan.data.mean_row_len if plan.data else inputs.sequence_len
        share = plan.data.labelled / max(plan.data.tokens, 1) if plan.data else 1.0
        measurement.calibrate(flops_per_token(inputs, plan.shape, width, share))
    cpu_mfu = measurement.mfu if measurement else None
    cpu_time = _time(plan, inputs, cpu, cpu_bf16, cpu_mfu, 1) if cpu.peak_tflops_16 or cpu.peak_tflops_32 else None
    report: dict[str, Any] = {
        "config": cfg.model.base_model or "model_config",
        "model": {"source": plan.shape.source, "model_type": plan.shape.model_type, "parameters": plan.shape.parameter_count(),
                  "description": plan.shape.describe()},
        "trainable_parameters": param_memory(inputs, plan.shape, True).trainable_numel,
        "inputs": _inputs_dict(inputs, plan),
        "headline": _headline(headline_row, target) if gpu_job else None,
        "device": shown.name if shown else cpu.name,
        "peak_gb": gb(main.peak_bytes),
        "phase": main.phase,
        "breakdown": {k: gb(v) for k, v in main.breakdown.items()},
        "host_gb": gb(main.host_bytes),
        "fits": main.peak_bytes <= (shown or cpu).memory_bytes,
        "gpus": gpus,
        "cpu": {"device": cpu.name, "memory_gb": cpu.memory_gib, **_estimate_dict(plan.memory),
                "note": "peak resident memory above the process's baseline after importing the training stack",
                "time": cpu_time, "peak_gflops": cpu_ceiling},
        "largest_batch": vars(max(plan.candidates, key=lambda b: (b.tokens, b.labelled))) if plan.candidates else None,
        "data": None if plan.data is None else {
            "examples": plan.data.examples, "tokens_per_epoch": plan.data.tokens, "labelled_per_epoch": plan.data.labelled,
            "max_length": plan.data.max_len, "truncated": plan.data.truncated,
            "micro_batches_per_epoch": plan.data.micro_batches_per_epoch},
        "run": None if length is None else {"steps": length.steps, "micro_batches": length.micro_batches, "epochs": round(length.epochs, 3) if plan.data else None,
                                           "real_tokens": length.real_tokens, "computed_tokens": length.computed_tokens},
        "prices": None if prices is None else {"source": prices.source, "currency": prices.currency, "as_of": prices.as_of,
                                               "example": prices.example},
        "measurement": measurement.as_dict() if measurement else None,
        "gpu_mfu": {"mfu": options.mfu or DEFAULT_GPU_MFU, "basis": "--mfu" if options.mfu else "assumed"},
        "notes": list(inputs.notes) + plan.notes + main.notes + ([] if length else [_length_note(cfg, options, plan.notes)]),
    }
    fitting = [g for g in gpus if g["fits"]]
    advice_target = target if (target and not report["fits"]) else (find_gpu(REFERENCE_GPU) if not fitting else None)
    if advice_target:
        report["advice"] = {"device": advice_target.name,
                            "ranked": [c.as_dict() for c in rank_changes(inputs, advice_target, estimator)],
                            "to_fit_one": [c.what for c in path_to_fit(inputs, advice_target, estimator)]}
    return report


def _length_note(cfg: LmforgeConfig, options: PlanOptions, plan_notes: list[str]) -> str:
    """Why time and cost are missing, and the one thing that gives them."""
    if not options.use_data:
        how = "drop --no-data (plan then counts the data's tokens) or set max_steps"
    elif cfg.data.datasets and plan_notes:
        how = "set max_steps (the data could not be read: see the note above)"
    else:
        how = "set max_steps"
    return f"time and cost need the run's length: {how}"


def _headline_row(gpus: list[dict[str, Any]], target: Device | None) -> dict[str, Any] | None:
    """The GPU row the headline answers with: --gpu's, else the fewest devices that fit (then the smallest card)."""
    if target:
        return next(g for g in gpus if g["gpu"] == target.name)
    return min((g for g in gpus if g["count"] is not None), key=lambda g: (g["count"], g["memory_gb"]), default=None)


def _headline(row: dict[str, Any] | None, target: Device | None) -> str:
    """One line: the peak per GPU and how many GPUs it takes."""
    if row is None:
        return f"no GPU in the table holds this run on up to {MAX_DEVICES} devices: see What to change below"
    peak = f"{row['peak_gb']:.2f} GiB per GPU"
    if row["count"] is None:
        return f"{peak} on {row['gpu']}: does not fit, not even sharded over {MAX_DEVICES} of them (see What to change below)"
    if row["count"] == 1 and row["fits"]:
        why = "" if target else ", the smallest card that fits alone"
        return f"{peak}: fits one {row['gpu']}{why}"
    if row["fits"]:  # the config already asks for several devices
        return f"{row['count_peak_gb']:.2f} GiB per GPU on {row['count']} x {row['gpu']} ({row['count_strategy']}), as configured"
    return (f"{peak}: one {row['gpu']} ({row['memory_gb']:.1f} GiB) is too small; the fewest that fit are "
            f"{row['count']} x {row['gpu']} under FSDP2/ZeRO-3, {row['count_peak_gb']:.2f} GiB each")


def _fmt_hours(h: float | None) -> str:
    if h is None:
        return "-"
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{int(h)}h {int((h % 1) * 60):02d}m"
    return f"{h / 24:.1f} days"


def render_text(r: dict[str, Any]) -> str:
    """The report for a terminal: for a GPU job the answer comes first (per-GPU peak, how many), this CPU after."""
    lines = [f"answer     {r['headline']}", ""] if r.get("headline") else []
    lines.append(f"model      {r['config']}: {r['model']['description']}")
    i = r["inputs"]
    method = {"full": "full fine-tuning", "lora": "LoRA", "qlora": f"QLoRA ({i.get('quantization', 'nf4')} base)"}[i["method"]]
    if i["method"] != "full":
        method += f" r={i['lora_r']} on {', '.join(i['lora_targets'])}{' (DoRA)' if i['dora'] else ''}"
    lines.append(f"training   {method}; {r['trainable_parameters']:,} trainable parameters; optimizer {i['optimizer']}; "
                 f"bf16: {i['bf16']}")
    batch = r["largest_batch"]
    lines.append(f"batch      micro-batch {i['micro_batch_size']} x sequence_len {i['sequence_len']}, accumulation "
                 f"{i['gradient_accumulation_steps']}; gradient checkpointing {'on' if i['gradient_checkpointing'] else 'off'}; "
                 f"attention {i['attn_implementation']}" + (f"; {i['sharding']} over {i['num_devices']}" if i["sharding"] != "none" else ""))
    if batch:
        lines.append(f"           largest micro-batch of the run: {batch['rows']} x {batch['width']} tokens, {batch['labelled']:,} "
                     f"labelled{', masked' if batch['masked'] else ''} ({batch['source']})")
    if r["data"]:
        d = r["data"]
        lines.append(f"data       {d['examples']:,} examples, {d['tokens_per_epoch']:,} tokens per epoch "
                     f"({d['labelled_per_epoch'] / max(d['tokens_per_epoch'], 1):.0%} labelled), longest {d['max_length']}")
    if r["run"]:
        run = r["run"]
        epochs = f"{run['epochs']:.2f} epochs" if run["epochs"] is not None else "epochs unknown (data not read)"
        lines.append(f"run        {run['steps']:,} optimizer steps = {run['micro_batches']:,} micro-batches = {epochs}, "
                     f"{run['real_tokens']:,} {'real' if run['epochs'] is not None else 'assumed (full rows)'} tokens")
    lines += ["", f"Peak memory per device on {r['device']}: {r['peak_gb']:.2f} GiB ({r['phase']})"]
    for key, value in r["breakdown"].items():
        if value:
            lines.append(f"  {key.replace('_', ' '):24s} {value:8.2f} GiB")
    if r["host_gb"]:
        lines.append(f"  host RAM (offloaded)     {r['host_gb']:8.2f} GiB")
    currency = r["prices"]["currency"] if r["prices"] else ""
    lines += ["", f"{'GPU':16s} {'memory':>7s} {'peak':>7s} {'fits':>5s} {'needed':>12s} {'time':>10s} {'cost':>10s}"]
    for g in r["gpus"]:
        need = "-" if g["count"] is None else (f"{g['count']}" if g["count_strategy"] in ("none", "ddp") else f"{g['count']} ({g['count_strategy']})")
        cost = (f"{g['cost']:,.2f} {currency}" if g["cost"] >= 0.1 else f"{g['cost']:.3f} {currency}") if g["cost"] is not None else "-"
        lines.append(f"{g['gpu']:16s} {g['memory_gb']:7.1f} {g['peak_gb']:7.2f} {'yes' if g['fits'] else 'no':>5s} {need:>12s} "
                     f"{_fmt_hours(g['hours']):>10s} {cost:>10s}{'' if g['bf16'] else '  (no bf16: fp32)'}")
    if r["prices"]:
        p = r["prices"]
        m = r["gpu_mfu"]
        lines.append(f"GPU time at {'an assumed ' if m['basis'] == 'assumed' else ''}{m['mfu']:.0%} MFU"
                     + (" (--mfu)" if m["basis"] == "--mfu" else " (--mfu to change)") + f"; cost from {p['source']} (as of {p['as_of']})"
                     + (" -- EXAMPLE PRICES, edit them" if p["example"] else ""))
    c = r["cpu"]
    cpu_line = f"\n{c['device']}, {c['memory_gb']:.1f} GiB RAM: peak {c['peak_gb']:.2f} GiB above the process baseline ({c['phase']}; bf16 {'on' if c['bf16'] else 'off'})"
    if c["time"] and c["time"]["hours"] is not None:
        cpu_line += f", {_fmt_hours(c['time']['hours'])} at MFU {c['time']['mfu']:.0%} ({c['time']['mfu_basis']})"
    lines.append(cpu_line)
    if r["measurement"]:
        m = r["measurement"]
        lines.append(f"measured   {m['steps']} steps here ({m.get('device', 'this CPU')}): {m['real_tokens_per_s']:.0f} real tokens/s, "
                     f"MFU {m['mfu']:.1%} of "
                     f"{m['peak_gflops']:.0f} GFLOP/s ({m['peak_dtype']} matmul ceiling); peak memory predicted "
                     f"{m['predicted_peak_mb'] or 0:,.0f} MiB, measured {m['measured_peak_mb'] or 0:,.0f} MiB")
    if "advice" in r:
        a = r["advice"]
        lines += ["", f"What to change (ranked by memory saved on {a['device']}):"]
        for change in a["ranked"]:
            lines.append(f"  {'fits' if change['fits'] else '    '} {change['peak_gb']:8.2f} GiB (-{change['saves_gb']:.2f})  {change['change']}: {change['why']}")
        if a["to_fit_one"]:
            lines.append(f"  to fit one {a['device']}: " + " + ".join(a["to_fit_one"]))
    for note in r["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
