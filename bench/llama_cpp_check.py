"""Bench: do lmforge's GGUF exports run in llama.cpp, and greedy-decode like lmforge's inference?

For every quantization lmforge writes, this exports the merged model with ``lmforge export``,
loads the file in llama.cpp (``llama-cpp-python``, built from PyPI into its own venv), and
compares llama.cpp's greedy tokens with lmforge's inference (transformers on the merged model,
fp32) for 3 chat prompts. It prints one Markdown table: per quantization, whether llama.cpp
tokenizes the prompts exactly as transformers does, how many generated tokens match before
the first difference, and whether the three answers are identical. For f32, f16 and q8_0 it also
converts the same merged model with llama.cpp's own ``convert_hf_to_gguf.py`` (from the same
llama-cpp-python sdist) and compares the files tensor by tensor and llama.cpp's answers on both.

    nice python bench/llama_cpp_check.py                          # trains a short adapter first
    nice python bench/llama_cpp_check.py --lora_model_dir outputs/smollm2-lora-gsm8k
    nice python bench/llama_cpp_check.py --build-only --jobs 1    # only build llama-cpp-python
    nice python bench/llama_cpp_check.py --identity               # K-quants vs llama.cpp's quantizer

Not in CI: building llama-cpp-python takes 15+ minutes on a 2-core machine. The build goes to
``bench/.venv-llama-cpp`` (git-ignored) with ``nice``, a CPU-only CMake configuration and
``--jobs`` parallel compile jobs (1 by default, so a shared machine keeps its other cores).
Files go to ``bench/runs/llama_cpp/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / "bench" / ".venv-llama-cpp"
RUNS = REPO / "bench" / "runs" / "llama_cpp"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # vendors llama.cpp 0c1e57098
CONFIG = REPO / "examples" / "smollm2-135m" / "lora-gsm8k.yml"
LMFORGE = Path(sys.executable).parent / "lmforge"  # the command users run, from the venv running this
QUANTS = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1",
          "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")
TEST_SET = REPO / "data" / "gsm8k" / "test.jsonl"  # held-out questions, in the adapter's training format
# CPU only; no server, examples or tests: only the shared library the Python package loads.
CMAKE_ARGS = "-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def build_llama_cpp(jobs: int) -> None:
    """Create the bench venv and build llama-cpp-python there (skipped when it already imports)."""
    python = venv_python()
    stamp = VENV / ".lmforge-llama-cpp"
    if python.exists() and stamp.is_file() and stamp.read_text().strip() == LLAMA_CPP_PYTHON:
        if subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
            return
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(jobs), MAKEFLAGS=f"-j{jobs}")
    log = VENV / "build.log"
    print(f"building {LLAMA_CPP_PYTHON} into {VENV} with {jobs} job(s) (15+ minutes on 2 cores); log: {log}", flush=True)
    start = time.time()
    with open(log, "w") as out:
        done = subprocess.run(
            ["nice", "-n", "10", str(python), "-m", "pip", "install", "--disable-pip-version-check", "-v",
             "numpy", LLAMA_CPP_PYTHON],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        sys.exit(f"building {LLAMA_CPP_PYTHON} failed; see {log}")
    stamp.write_text(LLAMA_CPP_PYTHON + "\n")
    print(f"built in {(time.time() - start) / 60:.1f} min", flush=True)


# Runs in the llama.cpp venv, one process per file (a file llama.cpp refuses cannot take the
# others down): load, tokenize each prompt text, greedy-decode from lmforge's prompt ids.
LLAMA_CPP_SIDE = r"""
import json, sys
import llama_cpp.llama_cpp as C
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
if not job.get("extra_bufts", True):
    # llama.cpp's model parameter use_extra_bufts = false: no AMX/repacked weight buffers
    default_params = C.llama_model_default_params
    def without_extra_bufts():
        params = default_params(); params.use_extra_bufts = False; return params
    C.llama_model_default_params = without_extra_bufts
try:
    llm = Llama(model_path=job["file"], n_ctx=1024, n_threads=job["threads"], verbose=False, seed=0,
                logits_all=bool(job.get("sequences") or job.get("probe")), lora_path=job.get("lora"))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"})); sys.exit(0)
meta = {k: llm.metadata.get(k) for k in ("tokenizer.ggml.pre", "tokenizer.ggml.eot_token_id", "general.file_type")}
results = []
for prompt in job["prompts"]:
    tokens = llm.tokenize(prompt["text"].encode(), add_bos=False, special=True)
    generated = []
    for token in llm.generate(prompt["ids"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        generated.append(int(token))
        if token in job["stop_ids"] or len(generated) >= job["max_new_tokens"]:
            break
    results.append({"prompt_ids": tokens, "generated": generated})
top1, top2 = [], []
for ids in job.get("sequences", []):
    llm.reset()
    llm.eval(ids)
    scores = llm.scores[: len(ids)]
    top1.append(scores.argmax(-1).tolist())
for ids in job.get("probe", []):  # logits' two largest after these ids: how close a tie is
    llm.reset()
    llm.eval(ids)
    row = llm.scores[len(ids) - 1]
    best = row.argsort()[-2:][::-1]
    top2.append([[int(t), float(row[t])] for t in best])
print(json.dumps({"meta": meta, "results": results, "top1": top1, "top2": top2}))
"""


REFERENCE_QUANTS = ("f32", "f16", "q8_0")  # what llama.cpp's own convert_hf_to_gguf.py writes of these


def reference_converter() -> Path:
    """llama.cpp's own ``convert_hf_to_gguf.py`` (with its ``gguf-py``), from the same llama-cpp-python sdist
    the bench builds, so lmforge's files can be compared with the reference converter's, tensor by tensor."""
    import tarfile

    root = RUNS / "reference"
    script = root / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    sdist = RUNS / "sdist"
    done = run([venv_python(), "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--no-binary", ":all:",
                "-d", sdist, LLAMA_CPP_PYTHON])
    if done.returncode != 0:
        sys.exit(f"downloading the {LLAMA_CPP_PYTHON} sdist failed:\n{done.stderr[-2000:]}")
    archive = next(sdist.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        wanted = []
        for member in tar.getmembers():
            inner = member.name.split("/vendor/llama.cpp/", 1)
            if len(inner) == 2 and (inner[1] == "convert_hf_to_gguf.py" or inner[1].startswith(("conversion/", "gguf-py/"))):
                member.name = "llama.cpp/" + inner[1]
                wanted.append(member)
        tar.extractall(root, members=wanted, filter="data")
    return script


def reference_file(merged_dir: Path, quant: str) -> Path | str:
    """The merged model converted by llama.cpp's converter (or why not)."""
    script = reference_converter()
    target = RUNS / f"reference-{quant}.gguf"
    env = dict(os.environ, PYTHONPATH=f"{script.parent / 'gguf-py'}:{script.parent}")
    done = run([sys.executable, script, merged_dir, "--outtype", quant, "--outfile", target], env=env)
    return target if done.returncode == 0 else f"converter failed: {done.stderr.strip().splitlines()[-1:]}"


def same_tensors(ours: Path, reference: Path) -> str:
    """How many tensors of the two files hold the same type, shape and bytes."""
    import numpy as np
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(reference).tensors}
    same = sum(
        a[n].tensor_type == b[n].tensor_type and list(a[n].shape) == list(b[n].shape)
        and np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8))
        for n in set(a) & set(b)
    )
    return f"{same}/{len(set(a) | set(b))}"


def append_results(title: str, report: str) -> None:
    """One dated section of bench/RESULTS.md: the table a run printed, under `title`."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(REPO / "bench" / "RESULTS.md", "a") as out:
        out.write(f"\n## {stamp}: {title}\n\n{report}\n")


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(["nice", "-n", "10", *map(str, cmd)], text=True, capture_output=True, **kwargs)


def train_adapter(folder: Path, steps: int) -> None:
    print(f"training a {steps}-step LoRA adapter on GSM8K into {folder}", flush=True)
    done = run([LMFORGE, "train", CONFIG, f"--max_steps={steps}", f"--output_dir={folder}",
                "--val_set_size=0", "--save_steps=1000", "--micro_batch_size=2", "--gradient_accumulation_steps=1"],
               cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"training failed:\n{done.stderr[-3000:]}")


def export(adapter: Path, quant: str, target: Path) -> tuple[str, str]:
    """``lmforge export CONFIG --lora_model_dir ADAPTER --quant QUANT --output TARGET`` (the CLI's entry point,
    in this process: a new process per file would import torch again each time); (the fidelity line or the
    error, 'ok' or 'refused')."""
    import contextlib
    import io

    from lmforge.cli import main as lmforge_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = lmforge_main(["export", str(CONFIG), "--lora_model_dir", str(adapter), "--quant", quant,
                             "--output", str(target)])
    lines = out.getvalue().splitlines()
    if code:
        return next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "?"), "refused"
    return next((line for line in lines if "fidelity vs" in line), "?"), "ok"


def greedy(model: object, ids: list[int], stop_ids: list[int], max_new_tokens: int, pad_id: int) -> list[int]:
    """transformers' greedy decoding, as lmforge's inference runs it."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id)
    return out[0, len(ids):].tolist()


def lmforge_greedy(adapter: Path, questions: list[str], max_new_tokens: int) -> tuple[list[dict], list[int], object]:
    """lmforge's inference: the training format around each question, greedy on the merged fp32 model."""
    from lmforge.config import load_config
    from lmforge.export.merge import merge_lora_in_memory
    from lmforge.infer.prompts import PromptBuilder

    cfg = load_config(str(CONFIG), [], check_paths=False)
    merged = merge_lora_in_memory(cfg.model.base_model, adapter)
    model, tokenizer = merged.model.eval(), merged.tokenizer
    stop_ids = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None})
    builder = PromptBuilder.from_config(cfg, tokenizer, model)
    prompts = []
    for question in questions:
        text = builder.single(question)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        generated = greedy(model, ids, stop_ids, max_new_tokens, tokenizer.pad_token_id)
        prompts.append({"text": text, "ids": ids, "generated": generated, "answer": tokenizer.decode(generated)})
    return prompts, stop_ids, merged


def top2_margin(model: object, ids: list[int]) -> float:
    """How far apart the model's two likeliest next tokens are (logits): small means a near tie."""
    import torch

    with torch.no_grad():
        top = model(input_ids=torch.tensor([ids])).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def llama_cpp_greedy(file: Path, prompts: list[dict], stop_ids: list[int], max_new_tokens: int, threads: int,
                     *, extra_bufts: bool = False, sequences: list[list[int]] | None = None,
                     probe: list[list[int]] | None = None, lora: Path | None = None, tag: str = "") -> dict:
    """llama.cpp's greedy tokens on ``file`` (one process per call: a crash takes only this call down).

    ``extra_bufts``: llama.cpp's default weight buffers (AMX / repacked on this CPU) rather than
    ``use_extra_bufts = false``; ``sequences``: also each position's top-1 token over these ids;
    ``probe``: the two largest logits after each of these ids; ``lora``: a LoRA GGUF applied at run time.
    """
    job = file.with_suffix(f".{tag or 'job'}.json")
    job.write_text(json.dumps({"file": str(file), "threads": threads, "stop_ids": stop_ids,
                               "max_new_tokens": max_new_tokens, "extra_bufts": extra_bufts,
                               "sequences": sequences or [], "probe": probe or [],
                               "lora": str(lora) if lora else None,
                               "prompts": [{"text": p["text"], "ids": p["ids"]} for p in prompts]}))
    done = run([venv_python(), "-c", LLAMA_CPP_SIDE, job])
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        if done.returncode < 0:
            import signal

            return {"error": f"crashed ({signal.Signals(-done.returncode).name})"}
        reason = next((line for line in done.stderr.splitlines() if "error" in line.lower()), done.stderr[-300:])
        return {"error": f"exit {done.returncode}: {reason.strip()}"}


def loads_with_defaults(file: Path, prompts: list[dict], stop_ids: list[int], threads: int) -> str:
    """'yes' or how llama.cpp fails on ``file`` with its default buffers (a 4-token greedy run)."""
    got = llama_cpp_greedy(file, prompts[:1], stop_ids, 4, threads, extra_bufts=True, tag="defaults")
    return got["error"] if "error" in got else "yes"


def shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# Runs in the llama.cpp venv: llama.cpp's own quantizer (llama-quantize's library call) on one file.
LLAMA_CPP_QUANTIZE = r"""
import json, sys, ctypes, llama_cpp
job = json.load(open(sys.argv[1]))
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, job["ftype"])
params.nthread = job["threads"]
if job.get("imatrix"):  # per-tensor mean squared activations, as llama-quantize --imatrix hands them over
    import numpy as np
    entries = dict(np.load(job["imatrix"]))
    keep = [np.ascontiguousarray(v, dtype=np.float32) for v in entries.values()]
    table = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
    for slot, name, values in zip(table, entries, keep):
        slot.name = name.encode()
        slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = values.size
    table[len(keep)].name = None
    params.imatrix = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(params))
info = llama_cpp.llama_print_system_info().decode()
print(json.dumps({"rc": int(rc), "version": llama_cpp.__version__, "system": info}))
"""
IDENTITY_QUANTS = ("q4_k_m", "q5_k_m", "q6_k", "q4_k_s", "q5_k_s", "q3_k_s", "q3_k_m", "q3_k_l", "q2_k")


def cpu_flags() -> str:
    """The CPU model and the SIMD flags that choose ggml's kernels (and the AMX q8_0 crash)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    return f"{model}; " + " ".join(f for f in wanted if f in flags)


def tensor_identity(ours: Path, reference: Path) -> tuple[dict[str, list[int]], list[str]]:
    """Per GGML type of llama.cpp's file: [byte-identical tensors, tensors]; and the names that differ."""
    import numpy as np
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(reference).tensors}
    per_type: dict[str, list[int]] = {}
    differing = []
    for name in sorted(set(a) | set(b)):
        ref = b.get(name)
        kind = ref.tensor_type.name if ref is not None else "missing"
        counts = per_type.setdefault(kind, [0, 0])
        counts[1] += 1
        mine = a.get(name)
        same = (mine is not None and ref is not None and mine.tensor_type == ref.tensor_type
                and np.array_equal(np.asarray(mine.data).view(np.uint8), np.asarray(ref.data).view(np.uint8)))
        counts[0] += same
        if not same:
            differing.append(f"{name} (ours {mine.tensor_type.name if mine is not None else '-'}, llama.cpp {kind})")
    return per_type, differing


def identity_run(args: argparse.Namespace) -> None:
    """lmforge's K-quant files vs llama.cpp's quantizer on the same f32 GGUF, tensor by tensor; and export times."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.config import load_config
    from lmforge.export.gguf import pre_tokenizer_for, write_gguf
    from lmforge.export.kquants import KQUANT_PRESETS
    from lmforge.models.load import local_model_dir
    from lmforge.models.trained import load_tokenizer_for

    RUNS.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    cfg = load_config(str(CONFIG), [], check_paths=False)
    base = cfg.model.base_model
    if args.lora_model_dir:
        from lmforge.export.merge import merge_lora_in_memory

        merged = merge_lora_in_memory(base, args.lora_model_dir)
        model, tokenizer, source = merged.model, merged.tokenizer, f"{base} + {shown(args.lora_model_dir)}"
    else:
        tokenizer = load_tokenizer_for(base)
        model = AutoModelForCausalLM.from_pretrained(local_model_dir(base), dtype=torch.float32)
        source = base
    pre = pre_tokenizer_for(tokenizer, base_model=base)
    f32 = write_gguf(model, tokenizer, RUNS / "identity-f32.gguf", "f32", tokenizer_pre=pre)
    imatrix, entries = None, None
    if args.imatrix:
        import numpy as np

        from lmforge.export.imatrix import compute_imatrix, read_imatrix, training_chunks, write_imatrix

        if not args.imatrix.exists():
            chunks, size = training_chunks(cfg, tokenizer, args.imatrix_chunks)
            sums, counts = compute_imatrix(model, chunks)
            write_imatrix(args.imatrix, sums, counts, [str(d.path) for d in cfg.data.datasets], len(chunks), size)
        entries = read_imatrix(args.imatrix)
        imatrix = RUNS / "identity-imatrix.npz"  # what the llama.cpp side hands to llama_model_quantize
        np.savez(imatrix, **entries)
    times: dict[str, list[float]] = {"q4_0": [], "q4_k_m": []}
    cpu: dict[str, list[float]] = {"q4_0": [], "q4_k_m": []}
    for quant in ("q4_0", "q4_k_m") * args.timing_rounds:  # alternating, the same machine, one process
        start, start_cpu = time.perf_counter(), time.process_time()
        write_gguf(model, tokenizer, RUNS / f"identity-{quant}.gguf", quant, tokenizer_pre=pre)
        times[quant].append(time.perf_counter() - start)
        cpu[quant].append(time.process_time() - start_cpu)
    rows, build = [], None
    suffix = "-imatrix" if imatrix else ""
    for quant in args.identity_quants.split(","):
        ours = RUNS / f"identity-{quant}{suffix}.gguf"
        start = time.perf_counter()
        write_gguf(model, tokenizer, ours, quant, tokenizer_pre=pre, imatrix=entries)
        seconds = time.perf_counter() - start
        theirs = RUNS / f"identity-{quant}{suffix}-llama-cpp.gguf"
        job = RUNS / f"identity-{quant}.job.json"
        ftype = "LLAMA_FTYPE_" + KQUANT_PRESETS[quant][0]
        job.write_text(json.dumps({"src": str(f32), "dst": str(theirs), "ftype": ftype, "threads": args.threads,
                                   "imatrix": str(imatrix) if imatrix else None}))
        done = run([venv_python(), "-c", LLAMA_CPP_QUANTIZE, job])
        try:
            got = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            got = {"rc": done.returncode, "error": done.stderr[-300:]}
        build = build or got
        if got.get("rc") != 0:
            rows.append(f"| {quant} | {ours.stat().st_size / 2**20:.1f} | | {seconds:.1f} | llama.cpp failed: {got} | |")
            continue
        per_type, differing = tensor_identity(ours, theirs)
        same = sum(c[0] for c in per_type.values())
        total = sum(c[1] for c in per_type.values())
        kinds = ", ".join(f"{k} {c[0]}/{c[1]}" for k, c in sorted(per_type.items()))
        rows.append(f"| {quant} | {ours.stat().st_size / 2**20:.1f} | {theirs.stat().st_size / 2**20:.1f}"
                    f" | {seconds:.1f} | {same}/{total} ({kinds}) | {', '.join(differing[:3]) or '-'} |")
        print(rows[-1], flush=True)
    table = ["| preset | lmforge MiB | llama.cpp MiB | lmforge quantize+write s | tensors byte-identical to"
             " llama.cpp's quantizer (per llama.cpp type) | differing |", "|---|---|---|---|---|---|", *rows]
    notes = [
        f"- Input: {source}, written by lmforge as f32 GGUF; llama.cpp quantized that file with"
        f" llama_model_quantize ({LLAMA_CPP_PYTHON}, llama-cpp-python {build.get('version') if build else '?'},"
        + (f" with the importance matrix {shown(args.imatrix)} ({len(entries)} matrices, computed by lmforge from"
           " the config's training data on the merged model) on both sides"
           if entries else " no imatrix") + "); lmforge quantized the same fp32 weights itself.",
        f"- llama.cpp system info: {(build or {}).get('system', '?').strip()}",
        f"- CPU: {cpu_flags()}; {os.cpu_count()} CPUs; load average {load_before:.1f} before,"
        f" {os.getloadavg()[0]:.1f} after.",
        f"- lmforge write_gguf (quantize + write, model in memory, no imatrix), {args.timing_rounds} alternating runs"
        f" each: q4_0 wall {', '.join(f'{t:.1f}' for t in times['q4_0'])} s, q4_k_m wall"
        f" {', '.join(f'{t:.1f}' for t in times['q4_k_m'])} s; best to best {min(times['q4_k_m']) / min(times['q4_0']):.2f}x,"
        f" median to median {sorted(times['q4_k_m'])[len(times['q4_k_m']) // 2] / sorted(times['q4_0'])[len(times['q4_0']) // 2]:.2f}x;"
        f" CPU time (all threads) best {min(cpu['q4_0']):.1f} s vs {min(cpu['q4_k_m']):.1f} s"
        f" ({min(cpu['q4_k_m']) / min(cpu['q4_0']):.2f}x).",
    ]
    report = "\n".join(table + [""] + notes)
    print("\n" + report)
    if not args.no_results:
        append_results("lmforge's K-quants vs llama.cpp's quantizer (`bench/llama_cpp_check.py --identity`)", report)


def heldout_sequences(merged: object, rows: list[dict], stop_ids: list[int]) -> list[list[int]]:
    """Held-out GSM8K examples (question and reference answer) in the training format, as token ids."""
    from lmforge.config import load_config
    from lmforge.infer.prompts import PromptBuilder

    cfg = load_config(str(CONFIG), [], check_paths=False)
    tokenizer = merged.tokenizer
    builder = PromptBuilder.from_config(cfg, tokenizer, merged.model)
    return [tokenizer(builder.single(row["question"]) + row["answer"], add_special_tokens=False).input_ids + stop_ids[:1]
            for row in rows]


def versus(reference: object, model: object, sequences: list[list[int]]) -> str:
    """Mean KL(reference || model) per position and top-1 agreement over ``sequences`` (transformers)."""
    import torch

    if model is reference:
        return "reference"
    kls, agree = [], []
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            ref = reference(input_ids=x).logits.float().log_softmax(-1)[0]
            got = model(input_ids=x).logits.float().log_softmax(-1)[0]
            kls.append((ref.exp() * (ref - got)).sum(-1))
            agree.append(ref.argmax(-1) == got.argmax(-1))
    kl, top1 = torch.cat(kls), torch.cat(agree).float()
    return f"mean KL {float(kl.mean()):.2g}, top-1 {float(top1.mean()):.1%}"


def agreement(top1: list[list[int]] | None, reference: list[list[int]] | None) -> str:
    """Share of positions where two llama.cpp runs pick the same top-1 token."""
    if not top1 or not reference:
        return "?"
    if top1 is reference:
        return "reference"
    same = sum(a == b for x, y in zip(top1, reference) for a, b in zip(x, y))
    total = sum(len(x) for x in reference)
    return f"{same / total:.1%} ({same}/{total})"


def llama_cpp_quantized(f32: Path, quant: str, threads: int, imatrix: Path | None = None) -> tuple[Path | str, dict]:
    """``f32`` quantized by llama.cpp's ``llama_model_quantize`` to the preset (or why not), and its build info."""
    from lmforge.export.kquants import KQUANT_PRESETS

    suffix = "-imatrix" if imatrix else ""
    theirs = RUNS / f"llama-cpp-{quant}{suffix}.gguf"
    job = RUNS / f"llama-cpp-{quant}{suffix}.job.json"
    job.write_text(json.dumps({"src": str(f32), "dst": str(theirs), "ftype": "LLAMA_FTYPE_" + KQUANT_PRESETS[quant][0],
                               "threads": threads, "imatrix": str(imatrix) if imatrix else None}))
    done = run([venv_python(), "-c", LLAMA_CPP_QUANTIZE, job])
    try:
        got = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        got = {"rc": done.returncode, "error": done.stderr[-300:]}
    if got.get("rc") != 0:
        return f"llama.cpp's quantizer failed: {got}", got
    return theirs, got


def first_difference(a: list[int], b: list[int]) -> int | None:
    k = common_prefix(a, b)
    return None if k == len(a) == len(b) else k


def lora_check(args: argparse.Namespace, adapter: Path, prompts: list[dict], stop_ids: list[int],
               merged: object) -> list[str]:
    """The adapter as a LoRA GGUF (f16 and f32) applied by llama.cpp on lmforge's f16 base GGUF, against
    lmforge's merged f16 export; where the greedy tokens part, the two largest logits on each side."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.config import load_config
    from lmforge.export.gguf import pre_tokenizer_for, write_gguf
    from lmforge.models.load import local_model_dir
    from lmforge.models.trained import load_tokenizer_for

    cfg = load_config(str(CONFIG), [], check_paths=False)
    base_name = cfg.model.base_model
    tokenizer = load_tokenizer_for(base_name)
    base = AutoModelForCausalLM.from_pretrained(local_model_dir(base_name), dtype=torch.float32)
    base_file = write_gguf(base, tokenizer, RUNS / "base-f16.gguf", "f16",
                           tokenizer_pre=pre_tokenizer_for(tokenizer, base_model=base_name))
    del base
    merged_file = RUNS / "model-f16.gguf"
    adapters = {}
    for quant in ("f16", "f32"):
        target = RUNS / f"adapter-{quant}.gguf"
        done = run([LMFORGE, "export", CONFIG, "--format", "gguf-lora", "--quant", quant, "--lora_model_dir", adapter,
                    "--output", target], cwd=REPO)
        if done.returncode != 0:
            return [f"- GGUF LoRA: `lmforge export --format gguf-lora` failed: {(done.stdout + done.stderr)[-300:]}"]
        adapters[quant] = target
    n = args.max_new_tokens
    ours = llama_cpp_greedy(merged_file, prompts, stop_ids, n, args.threads, tag="merged")
    runs = {q: llama_cpp_greedy(base_file, prompts, stop_ids, n, args.threads, lora=f, tag=f"lora-{q}")
            for q, f in adapters.items()}
    alone = llama_cpp_greedy(base_file, prompts, stop_ids, n, args.threads, tag="base")
    if "error" in ours or any("error" in r for r in runs.values()):
        return [f"- GGUF LoRA in llama.cpp failed: merged {ours.get('error', 'ok')}, "
                + ", ".join(f"{q} {r.get('error', 'ok')}" for q, r in runs.items())]
    lines = [f"**GGUF LoRA at run time** (`lmforge export --format gguf-lora`, adapter {shown(adapter)}) applied by"
             f" llama.cpp (`lora_path`) on lmforge's f16 GGUF of the base model, against lmforge's merged f16 export;"
             f" greedy, {n} tokens at most, the same 3 prompts:", "",
             "| llama.cpp on | identical answers to the merged f16 file | tokens before the first difference"
             " | at the first difference: top-2 logits (token: logit) on the merged f16 file; on base + LoRA;"
             " lmforge's fp32 merged model's top-2 margin |", "|---|---|---|---|"]
    setups = {f"base f16 + LoRA {q}": r for q, r in runs.items()}
    setups["base f16 alone (no adapter)"] = alone
    for label, got in setups.items():
        if "error" in got:
            lines.append(f"| {label} | {got['error']} | | |")
            continue
        pairs = list(zip(ours["results"], got["results"]))
        identical = sum(a["generated"] == b["generated"] for a, b in pairs)
        where = [first_difference(a["generated"], b["generated"]) for a, b in pairs]
        probes = [p["ids"] + a["generated"][:k] for p, (a, _), k in zip(prompts, pairs, where) if k is not None]
        detail = "-"
        if probes and "LoRA" in label:
            lora_file = adapters["f16" if "f16" in label.split("LoRA")[1] else "f32"]
            m = llama_cpp_greedy(merged_file, [], stop_ids, n, args.threads, probe=probes, tag="probe-merged")
            l = llama_cpp_greedy(base_file, [], stop_ids, n, args.threads, lora=lora_file, probe=probes, tag="probe-lora")
            margins = [top2_margin(merged.model, ids) for ids in probes]
            show = lambda pair: ", ".join(f"{t}: {v:.3f}" for t, v in pair)  # noqa: E731
            detail = "; ".join(f"[{show(a)}] vs [{show(b)}], fp32 margin {mg:.3f}"
                               for a, b, mg in zip(m.get("top2", []), l.get("top2", []), margins))
        lines.append(f"| {label} | {identical}/{len(prompts)} | {', '.join('all' if k is None else str(k) for k in where)}"
                     f" | {detail} |")
    return lines


# Runs in the llama.cpp venv: create_chat_completion with no template or chat format passed, and the prompt
# ids llama-cpp-python feeds llama.cpp for it (its Jinja2ChatFormatter on the file's tokenizer.chat_template).
LLAMA_CPP_CHAT = r"""
import json, sys
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
job = json.load(open(sys.argv[1]))
llm = Llama(model_path=job["file"], n_ctx=1024, n_threads=job["threads"], verbose=False, seed=0)
meta = llm.metadata
token = lambda key: llm._model.token_get_text(int(meta[key])) if key in meta else ""
messages = [{"role": "user", "content": job["question"]}]
rendered = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"], eos_token=token("tokenizer.ggml.eos_token_id"),
                               bos_token=token("tokenizer.ggml.bos_token_id"))(messages=messages)
ids = llm.tokenize(rendered.prompt.encode(), add_bos=False, special=True)
out = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                 max_tokens=job["max_tokens"], seed=0)
choice = out["choices"][0]
print(json.dumps({"chat_format": llm.chat_format, "prompt_ids": ids, "content": choice["message"]["content"],
                  "finish_reason": choice["finish_reason"], "eos": meta.get("tokenizer.ggml.eos_token_id"),
                  "eot": meta.get("tokenizer.ggml.eot_token_id")}))
"""


def chat_check(args: argparse.Namespace, adapter: Path) -> list[str]:
    """llama.cpp's create_chat_completion on lmforge's f16 export, with no template passed, against lmforge's
    inference: the same prompt ids, the same answer, and a stop at the trained end-of-turn token."""
    from lmforge.config import load_config
    from lmforge.export.merge import merge_lora_in_memory
    from lmforge.infer.prompts import PromptBuilder

    chat_dir = RUNS / "chat"
    chat_dir.mkdir(parents=True, exist_ok=True)
    template_config = chat_dir / "chat-template.yml"
    template_config.write_text(CONFIG.read_text().split("datasets:")[0] + "datasets:\n  - path: data/gsm8k/train.jsonl\n"
                               "    type: chat_template\nchat_template: tokenizer_default\nadapter: lora\n")
    cases = [("user-defined format (the demo config)", CONFIG, adapter),
             ("chat_template (tokenizer_default), the demo adapter", template_config, adapter)]
    alpaca = chat_dir / "alpaca-adapter"
    if (alpaca / "adapter_model.safetensors").is_file():
        cases.append(("alpaca (an adapter trained with type: alpaca)", chat_dir / "alpaca.yml", alpaca))
    question = json.loads(TEST_SET.read_text().splitlines()[0])["question"]
    lines = ["**The trained prompt format in the file**: llama-cpp-python's `create_chat_completion` on lmforge's f16"
             " export with no template or chat format passed, vs lmforge's inference (PromptBuilder.conversation,"
             f" transformers greedy on the merged fp32 model), user message = the first GSM8K test question,"
             f" {args.chat_tokens} tokens at most:", "",
             "| config | llama-cpp-python's chat format | prompt ids as lmforge's | same answer text"
             " | llama.cpp finish | lmforge stopped at | the file's EOS / EOT |", "|---|---|---|---|---|---|---|"]
    for label, config, folder in cases:
        target = chat_dir / f"{config.stem}-f16.gguf"
        done = run([LMFORGE, "export", config, "--lora_model_dir", folder, "--quant", "f16", "--output", target], cwd=REPO)
        if done.returncode != 0:
            lines.append(f"| {label} | export failed: {(done.stdout + done.stderr).strip().splitlines()[-1:]} | | | | | |")
            continue
        cfg = load_config(str(config), [], check_paths=False)
        merged = merge_lora_in_memory(cfg.model.base_model, folder)
        tokenizer = merged.tokenizer
        builder = PromptBuilder.from_config(cfg, tokenizer, merged.model)
        text = builder.conversation([{"role": "user", "content": question}])
        ids = tokenizer(text, add_special_tokens=False).input_ids
        stops = list(builder.stop_token_ids)
        generated = greedy(merged.model.eval(), ids, stops, args.chat_tokens, tokenizer.pad_token_id)
        answer = tokenizer.decode([t for t in generated if t not in stops])
        stopped = tokenizer.convert_ids_to_tokens(generated[-1]) if generated and generated[-1] in stops else "no stop"
        job = chat_dir / f"{config.stem}.chat.json"
        job.write_text(json.dumps({"file": str(target), "threads": args.threads, "question": question,
                                   "max_tokens": args.chat_tokens}))
        got_run = run([venv_python(), "-c", LLAMA_CPP_CHAT, job])
        try:
            got = json.loads(got_run.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            lines.append(f"| {label} | llama.cpp failed: exit {got_run.returncode} {got_run.stderr[-200:]!r} | | | | | |")
            continue
        same_text = got["content"].strip() == answer.strip()
        names = [tokenizer.convert_ids_to_tokens(int(got[k])) if got.get(k) is not None else "-" for k in ("eos", "eot")]
        lines.append(f"| {label} | {got['chat_format']} | {'yes' if got['prompt_ids'] == ids else 'no'} ({len(ids)} ids)"
                     f" | {'yes' if same_text else 'no'} ({len(generated)} tokens) | {got['finish_reason']}"
                     f" | `{stopped}` | `{names[0]}` / `{names[1]}` |")
        if not same_text:
            lines.append(f"|  | lmforge: {json.dumps(answer[:150])} | llama.cpp: {json.dumps(got['content'][:150])} | | | | |")
        del merged
    return lines


def render_table(rows: list[dict], prompts: list[dict]) -> list[str]:
    table = ["| quant | MiB | export's fidelity check (vs the fp32 merged model) | vs the f16 file on held-out text"
             " (transformers) | llama.cpp top-1 vs llama.cpp on f16 | llama.cpp loads: defaults / use_extra_bufts=false"
             " | prompt tokens as lmforge's | greedy tokens matching lmforge's | identical answers"
             " | lmforge's top-2 margin at the first difference | llama.cpp vs the file's weights in transformers"
             " | vs llama.cpp's own file (converter for f32/f16/q8_0, llama_model_quantize for K-quants) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        got = row.get("llama_cpp") or {}
        if row["export"] != "ok":
            table.append(f"| {row['quant']} | | {row['fidelity']} | | | no | | | | | | |")
            continue
        fid = row["fidelity"]
        short = fid[fid.find("mean KL"):fid.find(" (limits")] if "mean KL" in fid else fid
        loads = f"{row['defaults']} / {'no: ' + got['error'] if 'error' in got else 'yes (pre `' + str(got['meta']['tokenizer.ggml.pre']) + '`)'}"
        if "error" in got:
            table.append(f"| {row['quant']} | {row['mib']:.1f} | {short} | {row['vs_f16']} | | {loads} | | | | | | |")
            continue
        same_prompt = sum(r["prompt_ids"] == p["ids"] for r, p in zip(got["results"], prompts))
        matching = sum(common_prefix(r["generated"], p["generated"]) for r, p in zip(got["results"], prompts))
        total = sum(len(p["generated"]) for p in prompts)
        identical = sum(r["generated"] == p["generated"] for r, p in zip(got["results"], prompts))
        same_as_file = sum(common_prefix(r["generated"], f) for r, f in zip(got["results"], row["file_in_transformers"]))
        total_file = sum(len(f) for f in row["file_in_transformers"])
        vs_file = f"{same_as_file}/{total_file} = {same_as_file / max(total_file, 1):.0%}" if total_file else "not run"
        per_prompt = ", ".join(f"{common_prefix(r['generated'], p['generated'])}/{len(p['generated'])}"
                               for r, p in zip(got["results"], prompts))
        table.append(f"| {row['quant']} | {row['mib']:.1f} | {short} | {row['vs_f16']} | {row['llama_cpp_top1_vs_f16']}"
                     f" | {loads} | {same_prompt}/{len(prompts)}"
                     f" | {matching}/{total} = {matching / max(total, 1):.0%} ({per_prompt})"
                     f" | {'yes' if identical == len(prompts) else 'no'} ({identical}/{len(prompts)})"
                     f" | {', '.join('-' if m is None else f'{m:.2f}' for m in row['margins'])}"
                     f" | {vs_file}"
                     f" | {row.get('reference', '-')} |")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile jobs for the llama.cpp build")
    parser.add_argument("--build-only", action="store_true", help="build llama-cpp-python, then stop")
    parser.add_argument("--lora_model_dir", type=Path, default=None,
                        help=f"adapter trained with {CONFIG.relative_to(REPO)} (default: train one for --train-steps)")
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--quants", default=",".join(QUANTS))
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--no-results", action="store_true", help="print only; do not append to bench/RESULTS.md")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the comparison with llama.cpp's own converter (f32, f16, q8_0)")
    parser.add_argument("--identity", action="store_true",
                        help="only compare lmforge's K-quant files with llama.cpp's quantizer, tensor by tensor")
    parser.add_argument("--identity-quants", default=",".join(IDENTITY_QUANTS))
    parser.add_argument("--imatrix", type=Path, default=None,
                        help="--identity with this llama.cpp imatrix on both sides (computed from the config's data when missing)")
    parser.add_argument("--imatrix-chunks", type=int, default=32, help="--identity: windows of training tokens for the imatrix")
    parser.add_argument("--timing-rounds", type=int, default=3, help="--identity: alternating q4_0 / q4_k_m export timings")
    parser.add_argument("--heldout", type=int, default=12, help="held-out GSM8K examples for the fidelity vs f16")
    parser.add_argument("--no-chat", action="store_true", help="skip the GGUF LoRA and create_chat_completion checks")
    parser.add_argument("--no-file-greedy", action="store_true",
                        help="skip transformers' greedy decoding on each file's de-quantized weights")
    parser.add_argument("--only-lora-chat", action="store_true", help="only the GGUF LoRA and create_chat_completion checks")
    parser.add_argument("--chat-tokens", type=int, default=200, help="answer length cap in the chat check")
    args = parser.parse_args()
    build_llama_cpp(args.jobs)
    if args.build_only:
        return
    if args.identity:
        identity_run(args)
        return

    from lmforge.export.kquants import KQUANT_PRESETS

    RUNS.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    adapter = args.lora_model_dir
    if adapter is None:
        adapter = RUNS / "adapter"
        if not (adapter / "adapter_model.safetensors").is_file():
            train_adapter(adapter, args.train_steps)
    test_rows = [json.loads(line) for line in TEST_SET.read_text().splitlines()]
    questions = [row["question"] for row in test_rows[:3]]
    prompts, stop_ids, merged = lmforge_greedy(adapter, questions, args.max_new_tokens)
    pad_id = merged.tokenizer.pad_token_id
    if args.only_lora_chat:  # the LoRA and chat sections alone (e.g. beside a run of the table)
        if not (RUNS / "model-f16.gguf").is_file():
            export(adapter, "f16", RUNS / "model-f16.gguf")
        lines = lora_check(args, adapter, prompts, stop_ids, merged) + [""]
        lines += chat_check(args, adapter)
        lines += ["", f"- CPU: {cpu_flags()}; llama.cpp: {LLAMA_CPP_PYTHON} (llama.cpp 0c1e57098), use_extra_bufts"
                  f" = false for LoRA runs (f16); load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after."]
        report = "\n".join(lines)
        print("\n" + report)
        if not args.no_results:
            append_results("GGUF LoRA and the chat format in llama.cpp (`bench/llama_cpp_check.py --only-lora-chat`)", report)
        return
    sequences = heldout_sequences(merged, test_rows[3:3 + args.heldout], stop_ids)
    n_positions = sum(len(ids) for ids in sequences)

    merged_dir = None
    if not args.no_reference:
        merged_dir = RUNS / "merged"
        merged.model.save_pretrained(merged_dir)
        merged.tokenizer.save_pretrained(merged_dir)

    # f16 first: the fidelity reference
    quants = ["f16", *(q for q in args.quants.split(",") if q != "f16")]
    rows, build, f16_weights, f16_top1 = [], None, None, None
    for quant in quants:
        if rows:  # what is done so far, in case the run is cut short
            (RUNS / "partial.md").write_text("\n".join(render_table(rows, prompts)) + "\n")
        target = RUNS / f"model-{quant}.gguf"
        print(f"{quant}: exporting", flush=True)
        fidelity, status = export(adapter, quant, target)
        row = {"quant": quant, "export": status, "fidelity": fidelity}
        rows.append(row)
        if status != "ok":
            continue
        from lmforge.export.gguf import read_gguf_weights

        row["mib"] = target.stat().st_size / 2**20
        weights = read_gguf_weights(target, merged.model)
        if quant == "f16":
            f16_weights = weights
        row["vs_f16"] = versus(f16_weights, weights, sequences)
        print(f"{quant}: running llama.cpp", flush=True)
        row["defaults"] = loads_with_defaults(target, prompts, stop_ids, args.threads)
        got = llama_cpp_greedy(target, prompts, stop_ids, args.max_new_tokens, args.threads, sequences=sequences)
        row["llama_cpp"] = got
        if "error" in got:
            continue
        if quant == "f16":
            f16_top1 = got["top1"]
        row["llama_cpp_top1_vs_f16"] = agreement(got["top1"], f16_top1)
        # the file's own weights in transformers: tells what quantization changes from what llama.cpp does
        row["file_in_transformers"] = [] if args.no_file_greedy else [
            greedy(weights, p["ids"], stop_ids, args.max_new_tokens, pad_id) for p in prompts]
        if weights is not f16_weights:
            del weights
        row["margins"] = []
        for r, p in zip(got["results"], prompts):
            k = common_prefix(r["generated"], p["generated"])
            margin = top2_margin(merged.model, p["ids"] + p["generated"][:k]) if k < len(p["generated"]) else None
            row["margins"].append(margin)
        reference: Path | str | None = None
        if quant in KQUANT_PRESETS:
            # llama.cpp's quantizer reads an f32 GGUF of the same merged model (this run's, or --identity's)
            f32 = next((f for f in (RUNS / "model-f32.gguf", RUNS / "identity-f32.gguf") if f.is_file()), None)
            if f32 is None:
                export(adapter, "f32", RUNS / "model-f32.gguf")
                f32 = RUNS / "model-f32.gguf"
            reference, info = llama_cpp_quantized(f32, quant, args.threads)
            build = build or info
        elif merged_dir is not None and quant in REFERENCE_QUANTS:
            reference = reference_file(merged_dir, quant)
        if isinstance(reference, str):
            row["reference"] = reference
        elif reference is not None:
            ref_got = llama_cpp_greedy(reference, prompts, stop_ids, args.max_new_tokens, args.threads,
                                       sequences=sequences, tag="ref")
            same = sum(r["generated"] == q["generated"] for r, q in zip(got["results"], ref_got.get("results", [])))
            row["reference"] = (f"{same_tensors(target, reference)} tensors byte-identical;"
                                f" llama.cpp's answers on its file: {same}/{len(prompts)} as on ours;"
                                f" its top-1 vs f16 in llama.cpp {agreement(ref_got.get('top1'), f16_top1)};"
                                f" loads with defaults: {loads_with_defaults(reference, prompts, stop_ids, args.threads)}")

    table = render_table(rows, prompts)
    lora_lines = lora_check(args, adapter, prompts, stop_ids, merged) if not args.no_chat else []
    chat_lines = chat_check(args, adapter) if not args.no_chat else []
    load_after = os.getloadavg()[0]
    notes = [
        f"- llama.cpp: {LLAMA_CPP_PYTHON} (vendors llama.cpp 0c1e57098; CPU build with {CMAKE_ARGS}; {args.threads}"
        f" threads); system info: {(build or {}).get('system', '?').strip()}",
        f"- CPU: {cpu_flags()}; {os.cpu_count()} CPUs; load average {load_before:.1f} before, {load_after:.1f} after.",
        "- llama.cpp runs with its model parameter use_extra_bufts = false (plain CPU weight buffers) because with"
        " its defaults, on this AMX CPU, every quantized file crashes it, llama.cpp's own files included (the"
        " 'defaults' column and the last one); f32/f16 run either way.",
        f"- lmforge: transformers greedy on the merged fp32 model. Same prompt ids on both sides; generation stops at"
        f" {stop_ids} or after {args.max_new_tokens} tokens. 'Matching' counts tokens before the first difference;"
        " the margin is the gap between lmforge's two likeliest tokens (logits) where llama.cpp first differs.",
        f"- Held-out text: GSM8K test questions 4-{3 + args.heldout} with their reference answers in the training"
        f" format ({n_positions} next-token positions); the f16 file is the reference (KL(f16 || file), top-1 agreement)"
        " both in transformers (the files' de-quantized weights) and in llama.cpp (its own kernels on each file).",
        f"- Adapter: {shown(adapter)}; prompts: the first 3 questions of {TEST_SET.relative_to(REPO)} in the config's format.",
    ]
    for i, p in enumerate(prompts):
        notes.append(f"- lmforge's answer {i + 1}: {json.dumps(p['answer'])}")
    report = "\n".join(table + [""] + notes + [""] + lora_lines + [""] + chat_lines)
    print("\n" + report)
    (RUNS / "results.json").write_text(json.dumps({"rows": rows, "prompts": prompts}, indent=1, default=str))
    if not args.no_results:
        append_results("lmforge's GGUF exports in llama.cpp (`bench/llama_cpp_check.py`)", report)


if __name__ == "__main__":
    main()
