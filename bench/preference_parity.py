"""TRL 1.16's preference losses on one fixed tiny model and batch, written as reference numbers for lmforge's tests.

For DPO (sigmoid), IPO, hinge, ORPO, SimPO and KTO this runs TRL's own trainers (DPOTrainer._compute_loss,
experimental ORPOTrainer / CPOTrainer.get_batch_loss_metrics, KTOTrainer._compute_loss) on the same token ids
lmforge's objectives see, in fp32, and records the loss, the reported rewards and margins, and the gradient of
every parameter. tests/test_preference.py recomputes lmforge's numbers from the same weights and batch (both
stored in the JSON) and asks for agreement within 1e-5.

Run it with a Python that has trl==1.16.x (its own venv: bench/common.py's ensure_trl_venv, or a venv with
`pip install --no-deps trl==1.16.0` beside lmforge's packages):
    bench/.venv-trl/bin/python bench/preference_parity.py            # writes bench/preference_parity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "preference_parity.json"
VOCAB, PAD = 32, 0
BETA = 0.1
# Three pairs: prompt, chosen answer, rejected answer (token ids >= 4, clear of the specials); lengths differ so
# padding and per-token averages are exercised.
PAIRS = [
    ([5, 9, 12], [7, 8, 20, 2], [7, 30, 2]),
    ([6, 11], [14, 15, 16, 17, 2], [18, 2]),
    ([4, 10, 13, 21, 22], [25, 2], [26, 27, 28, 2]),
]
KTO_ROWS = [  # prompt, answer, desirable
    ([5, 9, 12], [7, 8, 20, 2], True),
    ([6, 11], [18, 2], False),
    ([4, 10, 13, 21, 22], [25, 2], True),
    ([8, 9], [26, 27, 28, 2], False),
]


def tiny_model(seed: int = 0):  # noqa: ANN201
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # larger weights than init's 0.02: log-probabilities that differ between answers
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def pad_rows(rows: list[list[int]], value: int) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [r + [value] * (width - len(r)) for r in rows]


def _tokenizer(folder: Path):  # noqa: ANN201
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, VOCAB)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(folder)
    return tok


def packed(tensor) -> str:  # noqa: ANN001
    """A float32 tensor as base64 of its bytes: exact, and a quarter of the JSON text of its decimals."""
    import base64

    return base64.b64encode(tensor.detach().float().contiguous().numpy().tobytes()).decode()


def _grads(model) -> dict[str, str]:  # noqa: ANN001
    return {n: packed(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def trl_numbers() -> dict:
    import torch
    from datasets import Dataset

    out: dict = {}
    folder = Path(tempfile.mkdtemp())
    tok = _tokenizer(folder)
    pref = Dataset.from_list([{"prompt": "t5", "chosen": "t6", "rejected": "t7"}] * 4)
    base = tiny_model()
    out["weights"] = {n: packed(p) for n, p in base.state_dict().items()}
    # The reference differs from the policy (another seed), so rewards and margins are not all zero.
    out["reference_weights"] = {n: packed(p) for n, p in tiny_model(seed=1).state_dict().items()}
    out["pairs"], out["kto_rows"], out["beta"] = PAIRS, KTO_ROWS, BETA

    # DPO family: TRL's DPOTrainer on [chosen rows; rejected rows] with a completion mask.
    from trl import DPOConfig, DPOTrainer

    rows = [p + c for p, c, _ in PAIRS] + [p + r for p, _, r in PAIRS]
    masks = [[0] * len(p) + [1] * len(c) for p, c, _ in PAIRS] + [[0] * len(p) + [1] * len(r) for p, _, r in PAIRS]
    inputs = {"input_ids": torch.tensor(pad_rows(rows, PAD)), "attention_mask": torch.tensor(pad_rows([[1] * len(r) for r in rows], 0)),
              "completion_mask": torch.tensor(pad_rows(masks, 0))}
    for name, loss_type in (("dpo_sigmoid", "sigmoid"), ("ipo", "ipo"), ("hinge", "hinge")):
        model = tiny_model()
        args = DPOConfig(output_dir=str(folder / name), beta=BETA, loss_type=[loss_type], report_to=[], use_cpu=True,
                         per_device_train_batch_size=3, bf16=False)
        trainer = DPOTrainer(model=model, ref_model=tiny_model(seed=1), args=args, train_dataset=pref, processing_class=tok)
        trainer.model.train()
        loss = trainer._compute_loss(trainer.model, dict(inputs), return_outputs=False)
        loss.backward()
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
        out[name] = {"loss": float(loss), "metrics": metrics, "grads": _grads(trainer.model)}

    # ORPO and SimPO: TRL's experimental ORPOTrainer / CPOTrainer (loss_type simpo).
    batch = {"chosen_input_ids": torch.tensor(pad_rows([p + c for p, c, _ in PAIRS], PAD)),
             "chosen_attention_mask": torch.tensor(pad_rows([[1] * len(p + c) for p, c, _ in PAIRS], 0)),
             "chosen_labels": torch.tensor(pad_rows([[-100] * len(p) + c for p, c, _ in PAIRS], -100)),
             "rejected_input_ids": torch.tensor(pad_rows([p + r for p, _, r in PAIRS], PAD)),
             "rejected_attention_mask": torch.tensor(pad_rows([[1] * len(p + r) for p, _, r in PAIRS], 0)),
             "rejected_labels": torch.tensor(pad_rows([[-100] * len(p) + r for p, _, r in PAIRS], -100))}
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    for name, trainer_cls, config in (
        ("orpo", ORPOTrainer, lambda d: ORPOConfig(output_dir=d, beta=BETA, report_to=[], use_cpu=True, bf16=False)),
        ("simpo", CPOTrainer, lambda d: CPOConfig(output_dir=d, beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.5,
                                                  report_to=[], use_cpu=True, bf16=False)),
    ):
        model = tiny_model()
        trainer = trainer_cls(model=model, args=config(str(folder / name)), train_dataset=pref, processing_class=tok)
        trainer.model.train()
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, dict(batch), "train")
        loss.backward()
        metrics = {k: float(v) for k, v in metrics.items() if k.startswith("rewards/")}
        out[name] = {"loss": float(loss), "metrics": metrics, "grads": _grads(trainer.model),
                     "settings": {"beta": trainer.beta, **({"gamma": 0.5, "cpo_alpha": 0.5} if name == "simpo" else {})}}

    # KTO: TRL's KTOTrainer with its KL rows (each prompt with the previous row's answer).
    from trl import KTOConfig, KTOTrainer

    kto_data = Dataset.from_list([{"prompt": "t5", "completion": "t6", "label": True}, {"prompt": "t5", "completion": "t7", "label": False}] * 2)
    answers = [a for _, a, _ in KTO_ROWS]
    kl_answers = answers[-1:] + answers[:-1]
    def rows_of(answer_list):  # noqa: ANN001, ANN202
        ids = [p + a for (p, _, _), a in zip(KTO_ROWS, answer_list)]
        cm = [[0] * len(p) + [1] * len(a) for (p, _, _), a in zip(KTO_ROWS, answer_list)]
        return (torch.tensor(pad_rows(ids, PAD)), torch.tensor(pad_rows([[1] * len(i) for i in ids], 0)), torch.tensor(pad_rows(cm, 0)))
    ids, att, cm = rows_of(answers)
    kl_ids, kl_att, kl_cm = rows_of(kl_answers)
    kto_inputs = {"input_ids": ids, "attention_mask": att, "completion_mask": cm, "KL_input_ids": kl_ids,
                  "KL_attention_mask": kl_att, "KL_completion_mask": kl_cm, "label": torch.tensor([d for _, _, d in KTO_ROWS])}
    model = tiny_model()
    args = KTOConfig(output_dir=str(folder / "kto"), beta=BETA, desirable_weight=1.0, undesirable_weight=1.5, report_to=[],
                     use_cpu=True, bf16=False, per_device_train_batch_size=4)
    trainer = KTOTrainer(model=model, ref_model=tiny_model(seed=1), args=args, train_dataset=kto_data, processing_class=tok)
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, dict(kto_inputs), return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/") or k == "kl"}
    out["kto"] = {"loss": float(loss), "metrics": metrics, "grads": _grads(trainer.model),
                  "settings": {"desirable_weight": 1.0, "undesirable_weight": 1.5}}
    import trl

    out["versions"] = {"trl": trl.__version__, "torch": torch.__version__}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        print("error: this script needs trl==1.16.x: run it with bench/.venv-trl/bin/python (see the docstring)", file=sys.stderr)
        return 2
    numbers = trl_numbers()
    args.out.write_text(json.dumps(numbers) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k} loss {numbers[k]['loss']:.6f}" for k in ("dpo_sigmoid", "ipo", "hinge", "orpo", "simpo", "kto")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
