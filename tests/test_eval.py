"""`lmforge eval` and the eval keys of `train`, checked against the libraries that define each number:
lm-eval's gsm8k scoring and HFLM, sacrebleu, rouge-score, and a plain transformers loss."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from conftest import DATA, REPO, build_tiny_llama, build_tiny_tokenizer, tiny_config, write_config, write_jsonl

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.answers import Extractor, choose_extractor, same_answer

# Generations that probe the edges of answer extraction: thousands separators, dollars, a final period, several
# '####', negative numbers, no number at all, a number with no '####', upper case, spaces.
GENERATIONS = [
    "She sells 16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\n#### 18",
    "It takes 2 + 1 = 3 bolts.\n#### 3.",
    "The profit is $70,000.\n#### $70,000",
    "#### 70,000 and then #### 5",
    "He runs 540 meters a week, so the answer is 540",
    "no idea at all",
    "#### -4",
    "The answer: 64.\n####  64",
    "#### 20.0",
    "about 1,000 things #### 1000",
]


def gsm8k_rows(n: int) -> list[dict]:
    lines = (DATA / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def lm_eval_gsm8k_scores(generations: list[str], references: list[str]) -> dict[str, list[bool]]:
    """Per filter of the shipped gsm8k_local task (lm-eval's gsm8k), lm-eval's own filters and exact_match per example."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters import build_filter_ensemble

    task = yaml.safe_load((REPO / "data" / "lm_eval_tasks" / "gsm8k_local.yaml").read_text(encoding="utf-8"))
    metric = {k: v for k, v in task["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")}
    out = {}
    for spec in task["filter_list"]:
        ensemble = build_filter_ensemble(spec["name"], [[f["function"], {k: v for k, v in f.items() if k != "function"}]
                                                        for f in spec["filter"]])
        resps = [[g] for g in generations]
        for f in ensemble.filters:
            resps = f().apply(resps, references)  # the ensemble holds partials of lm-eval's filter classes
        filtered = [r if isinstance(r, str) else r[0] for r in resps]
        out[spec["name"]] = [bool(exact_match_hf_evaluate([p], [ref], **metric)["exact_match"]) for p, ref in zip(filtered, references)]
    return out


def test_gsm8k_exact_match_equals_lm_eval_gsm8k_scoring() -> None:
    rows = gsm8k_rows(2 * len(GENERATIONS))
    references = [r["answer"] for r in rows]
    finals = [r.split("#### ")[-1] for r in references]
    # Half the generations end in the reference's own answer (some reformatted: $, a period, a thousands comma), half probe the edges.
    right = [f"Let me see.\n#### {f}" if i % 3 else f"So ${f}.\n#### ${f}." for i, f in enumerate(finals[: len(GENERATIONS)])]
    generations = right + GENERATIONS
    expected = lm_eval_gsm8k_scores(generations, references)
    for filter_name, name in (("strict-match", "gsm8k"), ("flexible-extract", "last_number")):
        extractor = Extractor.named(name)
        ours = [same_answer(extractor.extract(g), extractor.reference(r)) for g, r in zip(generations, references)]
        assert ours == expected[filter_name], filter_name
        assert 0 < sum(ours) < len(generations)  # the comparison has both outcomes in it


def test_extractors_boxed_regex_and_misses() -> None:
    assert Extractor.named("boxed").extract(r"so \boxed{\frac{1}{2}} and finally \boxed{42}") == "42"
    assert Extractor.named("boxed").extract(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert Extractor.named("boxed").extract("no box") is None
    assert Extractor.named("regex", r"answer is (\d+)").extract("The answer is 7.") == "7"
    assert Extractor.named("gsm8k").extract("the answer is 7") is None  # a miss, not a crash
    assert choose_extractor("auto", None, ["x #### 3"]).name == "gsm8k"
    assert choose_extractor("auto", None, [r"\boxed{3}"]).name == "boxed"
    assert choose_extractor("auto", None, ["Paris"]).name == "none"
    with pytest.raises(LmforgeError, match="eval_answer_regex"):
        Extractor.named("regex", None)
    with pytest.raises(LmforgeError, match="not a regular expression"):
        Extractor.named("regex", "(unclosed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("eval-tiny")
    build_tiny_tokenizer(folder)
    build_tiny_llama(folder, len(AutoTokenizer.from_pretrained(folder)))
    return folder, AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_text_perplexity_equals_transformers_loss(tiny) -> None:  # noqa: ANN001
    import torch

    from lmforge.eval.perplexity import text_perplexity, text_windows

    _, model, tokenizer = tiny
    text = " ".join(["the cat is red and the dog is blue", "what is two plus three ? five", "who are you ? i am a bird"] * 12)
    ours, scored = text_perplexity(model, tokenizer, text, window=24, max_windows=5, batch_size=2)
    nll = count = 0.0
    with torch.no_grad():
        for window in text_windows(tokenizer, text, 24, 5):
            ids = torch.tensor([window])
            loss = model(input_ids=ids, labels=ids).loss  # transformers' own shift and mean
            nll, count = nll + float(loss) * (len(window) - 1), count + len(window) - 1
    assert scored == count == 5 * 23
    assert abs(ours - math.exp(nll / count)) < 1e-4


def test_answer_perplexity_equals_transformers_loss_with_prompt_masked(tiny) -> None:  # noqa: ANN001
    import torch

    from lmforge.eval.perplexity import answer_perplexity

    _, model, tokenizer = tiny
    prompts = ["what is one plus two ?", "name a red bird", "the"]
    answers = [" three", " a red bird is a cat and a dog", " end"]
    ours, _ = answer_perplexity(model, tokenizer, prompts, answers, batch_size=2)  # padded batches of different lengths
    nll = count = 0.0
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            p = tokenizer(prompt, add_special_tokens=False).input_ids
            a = tokenizer(answer, add_special_tokens=False).input_ids
            ids = torch.tensor([p + a])
            labels = torch.tensor([[-100] * len(p) + a])
            nll, count = nll + float(model(input_ids=ids, labels=labels).loss) * len(a), count + len(a)
    assert abs(ours - math.exp(nll / count)) < 1e-4


def char_tokenizer(folder: Path):  # noqa: ANN201
    """A character-level tokenizer over printable ASCII: MMLU's letters and text all have their own ids."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_shipped_mc_task_accuracy_equals_lm_eval_hflm_on_the_merged_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lmforge's lm-eval run on base + adapter (as `lmforge eval` loads it) gives exactly HFLM's accuracy on the merged folder."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmforge.eval.harness import headline, run_lm_eval
    from lmforge.models.trained import load_for_generation

    monkeypatch.chdir(REPO)  # the shipped tasks' data paths are relative to the repository root
    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    tokenizer = char_tokenizer(base_dir)
    build_tiny_llama(base_dir, len(tokenizer), seed=3, max_position_embeddings=1024, initializer_range=0.3)
    torch.manual_seed(5)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                          LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False))
    peft.save_pretrained(adapter_dir)
    peft.merge_and_unload().save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)

    loaded = load_for_generation(str(base_dir), str(adapter_dir))
    ours = run_lm_eval(loaded.model, loaded.tokenizer, ["mmlu_dev_local"], batch_size=4, limit=8)
    from lmforge.eval.harness import task_manager

    theirs = simple_evaluate(model=HFLM(pretrained=str(merged_dir), batch_size=4, device="cpu"), tasks=["mmlu_dev_local"],
                             task_manager=task_manager(False), limit=8, bootstrap_iters=0)
    assert headline(ours)["mmlu_dev_local"]["acc"]["value"] == theirs["results"]["mmlu_dev_local"]["acc,none"]
    ll_ours = [float(r[0][0]) for s in ours["samples"]["mmlu_dev_local"] for r in s["resps"]]
    ll_theirs = [float(r[0][0]) for s in theirs["samples"]["mmlu_dev_local"] for r in s["resps"]]
    assert ll_ours == pytest.approx(ll_theirs, abs=1e-4)  # every choice's log-likelihood, not only the argmax
    # and the adapter was applied: the base alone scores the first choice differently
    base_only = load_for_generation(str(base_dir))
    ids = torch.tensor([tokenizer("Which is it?\nA. x\nAnswer: A").input_ids])
    with torch.no_grad():
        assert not torch.allclose(base_only.model(ids).logits, loaded.model(ids).logits, atol=1e-3)


# -- `lmforge eval` end to end ---------------------------------------------------------------------------------------


@pytest.fixture()
def eval_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny):  # noqa: ANN001, ANN201
    """A config over GSM8K-shaped rows, its tiny base model and a random adapter (a 'tuned' model that differs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = tiny[0]
    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    rows = [{"instruction": f"what is {a} plus {b} ?", "input": "", "output": f"{a} plus {b} equals {a + b} #### {a + b}"}
            for a in range(1, 6) for b in range(1, 4)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    config = tiny_config(model_dir, data, tmp_path / "out", val_set_size=5, eval_general_tasks=[], eval_general_tokens=64,
                         max_new_tokens=6, eval_metrics=["exact_match", "token_f1", "rouge_l", "bleu", "chrf", "ter", "perplexity"])
    return write_config(tmp_path / "config.yml", config), tmp_path


def test_eval_writes_table_outputs_and_scores_that_equal_sacrebleu_and_rouge_score(eval_setup, capsys) -> None:  # noqa: ANN001
    import sacrebleu
    from rouge_score import rouge_scorer

    config, tmp_path = eval_setup
    report = tmp_path / "report"
    code = main(["eval", str(config), "--lora_model_dir", str(tmp_path / "adapter"), "--output", str(report),
                 "--tasks", "mmlu_dev_local", "--limit", "4", "--batch_size", "3"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads((report / "eval.json").read_text())
    base, tuned = result["models"]
    assert (base["label"], tuned["label"]) == ("base", "tuned") and tuned["examples"] == 4
    assert result["seed"] == 42 and result["prompt_format"].startswith("datasets[0].type (alpaca)")
    assert result["versions"]["lm_eval"] == "0.4.13" and result["versions"]["sacrebleu"]
    assert "mmlu_dev_local/acc" in tuned["stderr"]  # lm-eval's standard error, kept
    assert "| exact_match ↑ |" in out.out and "task gain: exact_match" in out.out
    assert (report / "eval.png").stat().st_size > 1000 and (report / "lm_eval-mmlu_dev_local-tuned.jsonl").is_file()
    for row in (base, tuned):
        records = [json.loads(line) for line in (report / f"outputs-{row['label']}.jsonl").read_text().splitlines()]
        outputs, references = [r["output"] for r in records], [r["reference"] for r in records]
        assert len(records) == 4 and all(r["reference"].endswith(f"#### {r['reference_answer']}") for r in records)
        m = row["metrics"]
        assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, [references]).score, abs=1e-9)
        assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(outputs, [references]).score, abs=1e-9)
        assert m["ter"] == pytest.approx(sacrebleu.corpus_ter(outputs, [references]).score, abs=1e-9)
        scorer = rouge_scorer.RougeScorer(["rougeL", "rouge1"])
        scores = [scorer.score(r, o) for o, r in zip(outputs, references)]
        assert m["rouge_l"] == pytest.approx(100 * sum(s["rougeL"].fmeasure for s in scores) / 4, abs=1e-9)
        assert m["token_f1"] == pytest.approx(100 * sum(s["rouge1"].fmeasure for s in scores) / 4, abs=1e-9)
        # a random model never writes '####': every example is a miss, counted and reported, not a crash
        assert row["extract_misses"] == sum(r["extracted"] is None for r in records) == 4 and m["exact_match"] == 0
        assert m["general_perplexity"] > 1 and row["tokens_per_s"] > 0
    assert "found no answer in 4 of 4 outputs" in out.out
    assert base["metrics"] != tuned["metrics"]

    # The base row is cached by the weights' hash and the settings: the second run does not compute it again.
    assert main(["eval", str(config), "--lora_model_dir", str(tmp_path / "adapter"), "--output", str(report),
                 "--tasks", "mmlu_dev_local", "--limit", "4", "--batch_size", "3"]) == 0
    again = capsys.readouterr().out
    assert "base model: the row computed earlier" in again
    assert json.loads((report / "eval.json").read_text())["models"][0]["metrics"] == base["metrics"]


def test_eval_takes_a_merged_folder_and_a_checkpoint_folder(eval_setup, capsys) -> None:  # noqa: ANN001
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, tmp_path = eval_setup
    merged = tmp_path / "merged"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(yaml.safe_load(config.read_text())["base_model"]),
                              tmp_path / "adapter").merge_and_unload().save_pretrained(merged)
    build_tiny_tokenizer(merged)
    results = {}
    for name, flag in (("merged", ["--model", str(merged)]), ("adapter-as-model", ["--model", str(tmp_path / "adapter")])):
        assert main(["eval", str(config), *flag, "--output", str(tmp_path / name), "--limit", "3", "--no-base"]) == 0, capsys.readouterr().err
        results[name] = json.loads((tmp_path / name / "eval.json").read_text())["models"][0]["metrics"]
    # the merged weights and the adapter on its base are the same model
    assert results["merged"]["general_perplexity"] == pytest.approx(results["adapter-as-model"]["general_perplexity"], rel=1e-4)


def test_eval_reads_the_extractor_keys(eval_setup, capsys) -> None:  # noqa: ANN001
    config, tmp_path = eval_setup
    # The references end '#### N' (auto would pick gsm8k); a regex that matches every answer's first word instead.
    code = main(["eval", str(config), "--lora_model_dir", str(tmp_path / "adapter"), "--no-base", "--limit", "2",
                 "--output", str(tmp_path / "r"), "--eval_answer_extractor=regex", "--eval_answer_regex=^(\\w+)",
                 "--eval_general_text=null"])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads((tmp_path / "r" / "eval.json").read_text())["models"][0]
    assert report["extractor"] == "regex", out.err
    records = [json.loads(line) for line in (tmp_path / "r" / "outputs-tuned.jsonl").read_text().splitlines()]
    assert [r["reference_answer"] for r in records] == [r["reference"].split()[0] for r in records]
    assert "general_perplexity" not in report["metrics"]  # eval_general_text: null skips it


@pytest.mark.parametrize("flags,expected", [
    (["--limit", "0"], "--limit: --limit must be at least 1, got 0"),
    (["--tasks", "hellaswag_typo_xyz"], "unknown lm-eval task 'hellaswag_typo_xyz'"),
])
def test_eval_refuses_bad_flags_in_one_line(eval_setup, capsys, flags: list[str], expected: str) -> None:  # noqa: ANN001
    config, tmp_path = eval_setup
    assert main(["eval", str(config), "--lora_model_dir", str(tmp_path / "adapter"), *flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and expected in errors[0], errors


def test_hub_task_offline_refused_saying_how_to_run_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.eval.harness import check_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmforgeError) as exc:
        check_tasks(["arc_easy"])
    line = exc.value.format()
    assert "reads allenai/ai2_arc from the Hugging Face Hub" in line and "offline" in line
    assert "unset HF_HUB_OFFLINE" in line and "gsm8k_local, mmlu_dev_local" in line


def test_eval_refuses_an_adapter_that_does_not_fit_its_base(eval_setup, capsys) -> None:  # noqa: ANN001
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config, tmp_path = eval_setup
    other = tmp_path / "wider"
    build_tiny_tokenizer(other)
    build_tiny_llama(other, 60, hidden_size=48)
    get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "wrong")
    assert main(["eval", str(config), "--lora_model_dir", str(tmp_path / "wrong"), "--no-base"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "set base_model to that model" in errors[0], errors  # the checked loader's line


# -- during and after training ---------------------------------------------------------------------------------------


def test_train_scores_generations_at_each_eval_and_lm_eval_tasks_at_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                           tiny, alpaca_file: Path) -> None:  # noqa: ANN001
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmforge.config import load_config
    from lmforge.recipes.finetune import run_train

    monkeypatch.chdir(REPO)
    config = tiny_config(tiny[0], alpaca_file, tmp_path / "out", val_set_size=4, max_steps=4, eval_steps=2,
                         do_causal_lm_eval=True, eval_causal_lm_metrics=["sacrebleu", "chrf", "ter", "perplexity", "exact_match"],
                         eval_max_new_tokens=5, eval_causal_lm_examples=3, lm_eval_tasks=["mmlu_dev_local"], lm_eval_limit=3)
    summary = run_train(load_config(str(write_config(tmp_path / "c.yml", config))))
    history = summary["causal_lm_eval_history"]
    assert [step for step, _ in history] == [0, 2, 4]
    assert set(history[-1][1]) == {"causal_lm/bleu", "causal_lm/chrf", "causal_lm/ter", "causal_lm/perplexity", "causal_lm/exact_match"}
    assert summary["causal_lm_eval_end"] == history[-1][1]
    assert 0 <= summary["lm_eval"]["mmlu_dev_local"]["acc"]["value"] <= 1
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["lm_eval"] == summary["lm_eval"]
    events = EventAccumulator(str(next((tmp_path / "out").rglob("events.out.tfevents*")).parent)).Reload()
    tags = events.Tags()["scalars"]
    assert "causal_lm/chrf" in tags and "lm_eval/mmlu_dev_local/acc" in tags
    assert len(events.Scalars("causal_lm/chrf")) == 3


def test_train_without_the_keys_generates_nothing(tmp_path: Path, tiny, alpaca_file: Path) -> None:  # noqa: ANN001
    from lmforge.config import load_config
    from lmforge.recipes.finetune import run_train

    config = tiny_config(tiny[0], alpaca_file, tmp_path / "out", val_set_size=4, max_steps=2, eval_steps=2)
    summary = run_train(load_config(str(write_config(tmp_path / "c.yml", config))))
    assert "causal_lm_eval_history" not in summary and "lm_eval" not in summary


def test_eval_takes_a_gguf_file_and_scores_it_like_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    from test_export_gguf import export_model, make_model

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    folder = make_model(tmp_path / "hf")
    gguf = export_model(folder, tmp_path / "model-f32.gguf", "f32", data_type="alpaca", tokenizer_pre="gpt-2")
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "hello world", "input": "", "output": "the quick brown fox"}] * 3)
    config = write_config(tmp_path / "c.yml", {**tiny_config(Path(folder), data, tmp_path / "out", test_datasets=[{"path": str(data), "type": "alpaca"}],
                                                             eval_general_tasks=[], eval_general_tokens=32, max_new_tokens=4),
                                               "adapter": None, "lora_r": None, "lora_alpha": None, "lora_target_linear": None})
    scores = {}
    for name, source in (("folder", folder), ("gguf", str(gguf))):
        assert main(["eval", str(config), "--model", source, "--no-base", "--output", str(tmp_path / name)]) == 0, capsys.readouterr().err
        scores[name] = json.loads((tmp_path / name / "eval.json").read_text())["models"][0]["metrics"]
    assert scores["gguf"]["general_perplexity"] == pytest.approx(scores["folder"]["general_perplexity"], rel=1e-4)
    assert scores["gguf"]["perplexity"] == pytest.approx(scores["folder"]["perplexity"], rel=1e-4)


def test_batched_answers_equal_lm_eval_hflm_generate_until(tiny) -> None:  # noqa: ANN001
    """`lmforge eval`'s generation (longest first, left-padded batches) gives lm-eval HFLM's greedy answers (fp32)."""
    import random

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.heldout import generate_answers
    from lmforge.infer.generate import Generator, Sampling
    from lmforge.infer.prompts import PromptBuilder

    _, model, tokenizer = tiny
    rng = random.Random(0)
    words = "the a cat dog is what how many red blue one two three plus".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 30))) for _ in range(20)]
    generator = Generator(model, tokenizer, PromptBuilder(tokenizer, stop_token_ids=[tokenizer.eos_token_id]))
    ours, _ = generate_answers(generator, prompts, Sampling(max_new_tokens=10), batch_size=6)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=6, max_gen_toks=10)
    theirs = lm.generate_until([Instance("generate_until", {}, (p, {"until": ["</s>"], "max_gen_toks": 10, "do_sample": False}), i)
                                for i, p in enumerate(prompts)], disable_tqdm=True)
    assert [c.text.strip() for c in ours] == [t.strip() for t in theirs]
    assert len({c.text for c in ours}) > 5  # answers that differ from each other, so the order is checked too


# --- a preference or GRPO run is evaluated with the same command ------------------------------------------------------

def _eval_only(config: Path, report: Path) -> list[dict]:
    """`lmforge eval CONFIG --no-base`: the tuned model from output_dir; its held-out records."""
    assert main(["eval", str(config), "--output", str(report), "--no-base"]) == 0
    result = json.loads((report / "eval.json").read_text())
    assert [row["label"] for row in result["models"]] == ["tuned"]
    return [json.loads(line) for line in (report / "outputs-tuned.jsonl").read_text().splitlines()]


def test_eval_scores_a_dpo_run_on_the_pairs_it_held_out(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    # words the tiny word-level tokenizer decodes back unchanged (it spaces out '####'; a real BPE tokenizer does not)
    rows = [{"prompt": f"what is {a} plus {b} ?", "chosen": f"{a} plus {b} equals {a + b}",
             "rejected": f"{a} plus {b} equals {a + b + 1}"} for a in range(1, 6) for b in range(1, 4)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = write_config(tmp_path / "dpo.yml", tiny_config(
        tiny_model_dir, data, tmp_path / "out", rl="dpo", datasets=[{"path": str(data), "type": {"field_prompt": "prompt"}}],
        val_set_size=4, max_steps=2, eval_general_tasks=[], eval_general_tokens=64, max_new_tokens=6))
    assert main(["train", str(config)]) == 0
    records = _eval_only(config, tmp_path / "report")
    chosen = {r["chosen"]: r for r in rows}
    # the 4 pairs training held out (val_set_size), each prompt with its chosen answer as the reference
    assert len(records) == 4 and all(r["reference"] in chosen for r in records)
    assert all(r["prompt"].rstrip().endswith(chosen[r["reference"]]["prompt"]) for r in records)


def test_eval_scores_a_grpo_run_against_the_answer_its_prompts_carry(tmp_path: Path, tiny_model_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "rewards.py").write_text(
        "def prompts(cfg, *args, **kwargs):\n"
        "    return (lambda row: {'prompt': row['question'], 'answer': row['answer']}), {'remove_columns': ['question']}\n\n"
        "def length(completions, **kwargs):\n"
        "    return [float(len(c)) for c in completions]\n", encoding="utf-8")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"question": f"what is {a} plus {b} ?", "answer": f"#### {a + b}"}
                                                    for a in range(1, 6) for b in range(1, 4)])
    config = write_config(tmp_path / "grpo.yml", tiny_config(
        tiny_model_dir, data, tmp_path / "out", rl="grpo", datasets=[{"path": str(data), "type": "rewards.prompts"}],
        trl={"num_generations": 4, "max_completion_length": 4, "reward_funcs": ["rewards.length"]},
        val_set_size=3, max_steps=1, eval_general_tasks=[], eval_general_tokens=64, max_new_tokens=6))
    assert main(["train", str(config)]) == 0
    records = _eval_only(config, tmp_path / "report")
    assert len(records) == 3 and all(re.fullmatch(r"#### \d+", r["reference"]) for r in records)
    assert all(r["reference_answer"] == r["reference"][5:] for r in records)


JINJA = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
         "{% if add_generation_prompt %}assistant :{% endif %}")


def test_a_chat_template_dpo_config_prompts_inference_with_its_template(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`lmforge inference/serve/eval` on a chat_template.default pair config render chats as training rendered prompts."""
    from transformers import AutoTokenizer

    from lmforge.config import load_config
    from lmforge.infer.prompts import PromptBuilder

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"messages": [{"role": "user", "content": "hi"}],
                                                   "chosen": {"role": "assistant", "content": "hello"},
                                                   "rejected": {"role": "assistant", "content": "bye"}}])
    config = write_config(tmp_path / "dpo.yml", tiny_config(tiny_model_dir, data, tmp_path / "out", rl="dpo", chat_template="jinja",
                                                            chat_template_jinja=JINJA, datasets=[{"path": str(data), "type": "chat_template.default"}]))
    builder = PromptBuilder.from_config(load_config(str(config)), AutoTokenizer.from_pretrained(tiny_model_dir))
    assert builder.multi_turn
    assert builder.conversation([{"role": "user", "content": "hi"}]).endswith("user : hi . assistant :")


def test_a_grpo_config_whose_prompts_carry_no_answer_is_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Task metrics need a reference: GRPO prompts without an answer column are refused naming what to return."""
    from transformers import AutoTokenizer

    from lmforge.config import load_config
    from lmforge.eval.heldout import held_out_examples
    from lmforge.infer.prompts import PromptBuilder

    (tmp_path / "rewards.py").write_text(
        "def prompts(cfg, *args, **kwargs):\n    return (lambda row: {'prompt': row['question']}), {'remove_columns': ['question']}\n\n"
        "def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n", encoding="utf-8")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"question": f"what is {a} plus 1 ?"} for a in range(8)])
    config = write_config(tmp_path / "grpo.yml", tiny_config(
        tiny_model_dir, data, tmp_path / "out", rl="grpo", datasets=[{"path": str(data), "type": "rewards.prompts"}],
        trl={"num_generations": 4, "max_completion_length": 4, "reward_funcs": ["rewards.length"]}, val_set_size=2))
    cfg = load_config(str(config))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(LmforgeError) as refused:
        held_out_examples(cfg, tokenizer, PromptBuilder.from_config(cfg, tokenizer))
    line = refused.value.format()
    assert "\n" not in line and "the held-out prompts carry no reference answer" in line and "answer, reference" in line
