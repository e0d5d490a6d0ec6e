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
QUANTS = ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
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
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
try:
    llm = Llama(model_path=job["file"], n_ctx=2048, n_threads=job["threads"], verbose=False, seed=0)
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
print(json.dumps({"meta": meta, "results": results}))
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
    """``lmforge export`` as a user runs it; (the fidelity line or the error, 'ok' or 'refused')."""
    done = run([LMFORGE, "export", CONFIG, "--lora_model_dir", adapter, "--quant", quant,
                "--output", target], cwd=REPO)
    lines = (done.stdout + done.stderr).splitlines()
    if done.returncode != 0:
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


def llama_cpp_greedy(file: Path, prompts: list[dict], stop_ids: list[int], max_new_tokens: int, threads: int) -> dict:
    job = file.with_suffix(".job.json")
    job.write_text(json.dumps({"file": str(file), "threads": threads, "stop_ids": stop_ids,
                               "max_new_tokens": max_new_tokens,
                               "prompts": [{"text": p["text"], "ids": p["ids"]} for p in prompts]}))
    done = run([venv_python(), "-c", LLAMA_CPP_SIDE, job])
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        reason = next((line for line in done.stderr.splitlines() if "error" in line.lower()), done.stderr[-300:])
        return {"error": f"exit {done.returncode}: {reason.strip()}"}


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
    from lmforge.models.serving import load_tokenizer_for

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
    times: dict[str, float] = {}
    for quant in ("q4_0", "q4_k_m", "q4_0", "q4_k_m"):  # twice each, the second timed warm
        start = time.perf_counter()
        write_gguf(model, tokenizer, RUNS / f"identity-{quant}.gguf", quant, tokenizer_pre=pre)
        times[quant] = time.perf_counter() - start
    rows, build = [], None
    for quant in args.identity_quants.split(","):
        ours = RUNS / f"identity-{quant}.gguf"
        start = time.perf_counter()
        write_gguf(model, tokenizer, ours, quant, tokenizer_pre=pre)
        seconds = time.perf_counter() - start
        theirs = RUNS / f"identity-{quant}-llama-cpp.gguf"
        job = RUNS / f"identity-{quant}.job.json"
        ftype = "LLAMA_FTYPE_" + KQUANT_PRESETS[quant][0]
        job.write_text(json.dumps({"src": str(f32), "dst": str(theirs), "ftype": ftype, "threads": args.threads}))
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
        f" no imatrix); lmforge quantized the same fp32 weights itself.",
        f"- llama.cpp system info: {(build or {}).get('system', '?').strip()}",
        f"- CPU: {cpu_flags()}; {os.cpu_count()} CPUs; load average {load_before:.1f} before,"
        f" {os.getloadavg()[0]:.1f} after.",
        f"- lmforge write_gguf (quantize + write, model in memory), second of two runs: q4_0 {times['q4_0']:.1f} s,"
        f" q4_k_m {times['q4_k_m']:.1f} s ({times['q4_k_m'] / times['q4_0']:.2f}x).",
    ]
    report = "\n".join(table + [""] + notes)
    print("\n" + report)
    if not args.no_results:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(REPO / "bench" / "RESULTS.md", "a") as out:
            out.write(f"\n## {stamp}: lmforge's K-quants vs llama.cpp's quantizer (`bench/llama_cpp_check.py --identity`)"
                      f"\n\n{report}\n")


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
    args = parser.parse_args()
    build_llama_cpp(args.jobs)
    if args.build_only:
        return
    if args.identity:
        identity_run(args)
        return

    RUNS.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    adapter = args.lora_model_dir
    if adapter is None:
        adapter = RUNS / "adapter"
        if not (adapter / "adapter_model.safetensors").is_file():
            train_adapter(adapter, args.train_steps)
    questions = [json.loads(line)["question"] for line in TEST_SET.read_text().splitlines()[:3]]
    prompts, stop_ids, merged = lmforge_greedy(adapter, questions, args.max_new_tokens)
    pad_id = merged.tokenizer.pad_token_id

    merged_dir = None
    if not args.no_reference:
        merged_dir = RUNS / "merged"
        merged.model.save_pretrained(merged_dir)
        merged.tokenizer.save_pretrained(merged_dir)

    rows = []
    for quant in args.quants.split(","):
        target = RUNS / f"model-{quant}.gguf"
        print(f"{quant}: exporting", flush=True)
        fidelity, status = export(adapter, quant, target)
        row = {"quant": quant, "export": status, "fidelity": fidelity}
        if status == "ok":
            row["mib"] = target.stat().st_size / 2**20
            print(f"{quant}: running llama.cpp", flush=True)
            got = llama_cpp_greedy(target, prompts, stop_ids, args.max_new_tokens, args.threads)
            row["llama_cpp"] = got
            if "error" not in got:
                # the file's own weights in transformers: tells what quantization changes from what llama.cpp does
                from lmforge.export.gguf import read_gguf_weights

                weights = read_gguf_weights(target, merged.model)
                row["file_in_transformers"] = [greedy(weights, p["ids"], stop_ids, args.max_new_tokens, pad_id)
                                               for p in prompts]
                del weights
                row["margins"] = []
                for r, p in zip(got["results"], prompts):
                    k = common_prefix(r["generated"], p["generated"])
                    margin = top2_margin(merged.model, p["ids"] + p["generated"][:k]) if k < len(p["generated"]) else None
                    row["margins"].append(margin)
                if merged_dir is not None and quant in REFERENCE_QUANTS:
                    reference = reference_file(merged_dir, quant)
                    if isinstance(reference, str):
                        row["reference"] = reference
                    else:
                        ref_got = llama_cpp_greedy(reference, prompts, stop_ids, args.max_new_tokens, args.threads)
                        same = sum(r["generated"] == q["generated"] for r, q in zip(got["results"], ref_got.get("results", [])))
                        row["reference"] = (f"{same_tensors(target, reference)} tensors byte-identical;"
                                            f" llama.cpp's answers on its file: {same}/{len(prompts)} the same as on ours")
        rows.append(row)

    table = ["| quant | MiB | export's fidelity check | llama.cpp loads | prompt tokens as lmforge's"
             " | greedy tokens matching lmforge's | identical answers | lmforge's top-2 margin at the first difference"
             " | llama.cpp vs the file's weights in transformers | vs llama.cpp's own converter |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        got = row.get("llama_cpp") or {}
        if row["export"] != "ok" or "error" in got:
            reason = row["fidelity"] if row["export"] != "ok" else got["error"]
            table.append(f"| {row['quant']} | | {reason} | no | | | | | | |")
            continue
        fid = row["fidelity"]
        short = fid[fid.find("mean KL"):fid.find(" (limits")] if "mean KL" in fid else fid
        same_prompt = sum(r["prompt_ids"] == p["ids"] for r, p in zip(got["results"], prompts))
        matching = sum(common_prefix(r["generated"], p["generated"]) for r, p in zip(got["results"], prompts))
        total = sum(len(p["generated"]) for p in prompts)
        identical = sum(r["generated"] == p["generated"] for r, p in zip(got["results"], prompts))
        same_as_file = sum(common_prefix(r["generated"], f) for r, f in zip(got["results"], row["file_in_transformers"]))
        total_file = sum(len(f) for f in row["file_in_transformers"])
        per_prompt = ", ".join(f"{common_prefix(r['generated'], p['generated'])}/{len(p['generated'])}"
                               for r, p in zip(got["results"], prompts))
        table.append(f"| {row['quant']} | {row['mib']:.0f} | {short} | yes (pre `{got['meta']['tokenizer.ggml.pre']}`)"
                     f" | {same_prompt}/{len(prompts)} | {matching}/{total} = {matching / max(total, 1):.0%} ({per_prompt})"
                     f" | {'yes' if identical == len(prompts) else 'no'} ({identical}/{len(prompts)})"
                     f" | {', '.join('-' if m is None else f'{m:.2f}' for m in row['margins'])}"
                     f" | {same_as_file}/{total_file} = {same_as_file / max(total_file, 1):.0%}"
                     f" | {row.get('reference', '-')} |")
    load_after = os.getloadavg()[0]
    notes = [
        f"- llama.cpp: {LLAMA_CPP_PYTHON} (CPU build, {args.threads} threads); lmforge: transformers greedy on the"
        " merged fp32 model. Same prompt ids on both sides; generation stops at"
        f" {stop_ids} or after {args.max_new_tokens} tokens. 'Matching' counts tokens before the first difference."
        " The margin is the gap between lmforge's two likeliest tokens (logits) where llama.cpp first differs"
        " (a near tie that rounding can flip when small); the next column runs transformers' greedy decoding on"
        " the file's de-quantized weights, so it separates what the quantization changes from what llama.cpp does."
        " The last column converts the same merged model with llama.cpp's own convert_hf_to_gguf.py (from the"
        f" {LLAMA_CPP_PYTHON} sdist) where it writes that type, and compares the tensors and llama.cpp's answers.",
        f"- Adapter: {shown(adapter)}; prompts: the first 3 questions of {TEST_SET.relative_to(REPO)} in the config's format.",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average {load_before:.1f}"
        f" before, {load_after:.1f} after.",
    ]
    for i, p in enumerate(prompts):
        notes.append(f"- lmforge's answer {i + 1}: {json.dumps(p['answer'])}")
    report = "\n".join(table + [""] + notes)
    print("\n" + report)
    (RUNS / "results.json").write_text(json.dumps({"rows": rows, "prompts": prompts}, indent=1))
    if not args.no_results:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(REPO / "bench" / "RESULTS.md", "a") as out:
            out.write(f"\n## {stamp}: lmforge's GGUF exports in llama.cpp (`bench/llama_cpp_check.py`)\n\n{report}\n")


if __name__ == "__main__":
    main()
