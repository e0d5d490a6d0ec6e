"""Tokenizer training: both backends, both model types, on a slice of Tiny Shakespeare."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.data.tokenizer_train import train_tokenizer
from lmforge.errors import LmforgeError

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data/tinyshakespeare/input.txt"

# Text the training slice never saw: unicode, tabs, runs of spaces, a leading space, digits.
UNSEEN = " Zwölf Boxkämpfer jagen Viktor — 😀\tquer über den  großen   Sylter Deich. 12345\n\nend"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "slice.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    return path


@pytest.mark.parametrize("backend", ["hf", "sentencepiece"])
@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_save_load_roundtrip(corpus: Path, tmp_path: Path, backend: str, model_type: str) -> None:
    from transformers import AutoTokenizer

    report = train_tokenizer([str(corpus)], str(tmp_path / "tok"), vocab_size=600, model_type=model_type,
                             backend=backend, held_out_fraction=0.05)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok.is_fast
    assert len(tok) == report.vocab_size == 600
    # Special tokens are set and have the fixed ids 0..4.
    assert (tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token, tok.mask_token) == (
        "<pad>", "<unk>", "<s>", "</s>", "<mask>")
    assert [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id] == [0, 1, 2, 3, 4]
    assert report.special_token_ids == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}
    # Special tokens in text are single ids; ordinary text round-trips exactly, even unseen characters.
    text = "to be <mask> not</s>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.mask_token_id in ids and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == text
    ids = tok.encode(UNSEEN, add_special_tokens=False)
    assert tok.decode(ids) == UNSEEN
    assert tok.unk_token_id not in ids  # byte-level / byte fallback: nothing is unknown
    # The report measured the held-out chunks, which were kept out of training.
    assert report.roundtrip_exact
    assert 6_000 < report.heldout_chars < 14_000  # ≈ 5% of 200 kB, in ~2 kB chunks
    assert report.train_bytes + report.heldout_chars == pytest.approx(200_000, rel=0.01)
    assert 1.0 < report.tokens_per_word < 3.0
    assert report.heldout_tokens == pytest.approx(report.heldout_words * report.tokens_per_word, rel=1e-3)


def test_sentencepiece_conversion_matches_sentencepiece(corpus: Path, tmp_path: Path) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    train_tokenizer([str(corpus)], str(tmp_path), vocab_size=500, backend="sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = SHAKESPEARE.read_text(encoding="utf-8")[500_000:510_000] + UNSEEN
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)


def test_bigger_vocab_means_fewer_tokens_and_held_out_files(corpus: Path, tmp_path: Path) -> None:
    held = tmp_path / "held.txt"
    held.write_text(SHAKESPEARE.read_text(encoding="utf-8")[600_000:620_000], encoding="utf-8")
    small = train_tokenizer([str(corpus)], str(tmp_path / "a"), 400, held_out_fraction=0, held_out_files=[str(held)])
    big = train_tokenizer([str(corpus)], str(tmp_path / "b"), 2000, held_out_fraction=0, held_out_files=[str(held)])
    assert small.heldout_chars == big.heldout_chars == 20_000
    assert big.tokens_per_word < small.tokens_per_word


def test_add_bos_token(corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    train_tokenizer([str(corpus)], str(tmp_path), 400, add_bos_token=True)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok("hello")["input_ids"][0] == tok.bos_token_id
    assert tok("hello", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"vocab_size": 100}, "too small"), ({"backend": "tiktoken"}, "sentencepiece"),
     ({"model_type": "wordpiece"}, "unigram"), ({"files": ["/nonexistent/x.txt"]}, "no such text file"),
     ({"bos_token": "<pad>"}, "distinct")],
)
def test_errors(corpus: Path, tmp_path: Path, kwargs: dict, needle: str) -> None:
    args = {"files": [str(corpus)], "out_dir": str(tmp_path), "vocab_size": 400, **kwargs}
    with pytest.raises(LmforgeError, match=needle):
        train_tokenizer(**args)
