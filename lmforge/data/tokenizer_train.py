"""Train a tokenizer from raw text files and save it as a Hugging Face tokenizer folder.

Two backends, both ending in the same place (a ``tokenizer.json`` folder that
``AutoTokenizer.from_pretrained`` loads as a fast tokenizer):

- ``hf``: the ``tokenizers`` library. Byte-level pre-tokenization (GPT-2 style) for both
  ``bpe`` and ``unigram``: every byte is in the alphabet, so nothing is ever ``<unk>`` and
  ``decode(encode(text)) == text`` exactly.
- ``sentencepiece``: Google's trainer (the Llama/T5 recipe), with byte fallback and identity
  normalization so text round-trips; the ``.model`` is converted with transformers' own
  SentencePiece converter and saved with ``save_pretrained`` (the ``.model`` is kept too).

Text is streamed in chunks of lines (never a whole file in memory). A deterministic slice
of the chunks (or whole ``held_out_files``) is kept out of training and used to report
tokens per word, the number that says how well the vocabulary fits the text.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from lmforge.atomic import publish_into
from lmforge.data.compressed import guard, open_text
from lmforge.data.sources import expand_paths
from lmforge.errors import LmforgeError

ModelType = Literal["bpe", "unigram"]
Backend = Literal["sentencepiece", "hf"]

# Lines are grouped into chunks of this many bytes: long enough that a training "sentence"
# carries newlines and indentation (code, verse), short enough for SentencePiece's
# max_sentence_length (the default 4192 bytes; longer sentences are silently dropped).
CHUNK_BYTES = 2000
# Cap on held-out text kept in memory for the report; more would only slow the report.
MAX_HELDOUT_CHARS = 2_000_000


@dataclass
class SpecialTokens:
    """The special tokens every trained tokenizer gets, in id order 0..4."""

    pad: str = "<pad>"
    unk: str = "<unk>"
    bos: str = "<s>"
    eos: str = "</s>"
    mask: str = "<mask>"

    def as_list(self) -> list[str]:
        return [self.pad, self.unk, self.bos, self.eos, self.mask]


@dataclass
class TokenizerReport:
    """What :func:`train_tokenizer` did, for the CLI to print and the run log to keep."""

    out_dir: str
    backend: str
    model_type: str
    requested_vocab_size: int
    vocab_size: int
    seconds: float
    train_bytes: int
    heldout_chars: int
    heldout_words: int
    heldout_tokens: int
    tokens_per_word: float
    chars_per_token: float
    roundtrip_exact: bool
    special_token_ids: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _iter_chunks(path: str) -> Iterator[str]:
    """Yield runs of whole lines of about CHUNK_BYTES characters from a text file."""
    buf: list[str] = []
    size = 0
    with guard(path), open_text(path, errors="replace") as f:
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= CHUNK_BYTES:
                yield "".join(buf)
                buf, size = [], 0
    if buf:
        yield "".join(buf)


class _Splitter:
    """Deterministic train/held-out split of a stream of chunks.

    Every ``period``-th chunk is held out (chunk, not line, so a held-out passage is not
    half-seen in training through its neighbouring lines). The split depends only on the
    files and the fraction, so two runs agree.
    """

    def __init__(self, files: list[str], held_out_files: list[str], fraction: float) -> None:
        self.files = files
        self.held_out_files = held_out_files
        self.period = round(1 / fraction) if fraction > 0 else 0
        self.heldout: list[str] = []
        self.heldout_chars = 0
        self.train_bytes = 0

    def _keep(self, chunk: str) -> None:
        if self.heldout_chars < MAX_HELDOUT_CHARS:
            self.heldout.append(chunk)
            self.heldout_chars += len(chunk)

    def train_chunks(self) -> Iterator[str]:
        # Held-out collection happens as a side effect of the training pass, so the files
        # are read once; a second pass over train_chunks() recollects nothing.
        collect = not self.heldout
        n = 0
        for path in self.files:
            for chunk in _iter_chunks(path):
                n += 1
                if self.period and n % self.period == 0:
                    if collect:
                        self._keep(chunk)
                    continue
                self.train_bytes += len(chunk.encode("utf-8"))
                yield chunk
        if collect:
            for path in self.held_out_files:
                for chunk in _iter_chunks(path):
                    self._keep(chunk)


def _train_hf(splitter: _Splitter, vocab_size: int, model_type: ModelType, special: SpecialTokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if model_type == "bpe":
        tok = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special.as_list(),
            initial_alphabet=alphabet,
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=special.as_list(),
            initial_alphabet=alphabet,
            unk_token=special.unk,
            show_progress=False,
        )
    # add_prefix_space=False: a leading space would not survive decode, breaking round trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(splitter.train_chunks(), trainer=trainer)
    return tok


def _train_sentencepiece(
    splitter: _Splitter, vocab_size: int, model_type: ModelType, special: SpecialTokens, out_dir: Path
):
    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=splitter.train_chunks(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece=special.pad, unk_piece=special.unk, bos_piece=special.bos, eos_piece=special.eos,
            control_symbols=[special.mask],
            # identity + keep whitespace + byte fallback: decode(encode(x)) == x for any text.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            # No dummy "▁" prefix: with it, a leading space or the text after a special token
            # cannot round-trip through the converted tokenizer. Spaces are kept literally,
            # as in byte-level BPE.
            add_dummy_prefix=False,
            byte_fallback=True,
            # Split digits so numbers do not eat the vocabulary (Llama does the same).
            split_digits=True,
            max_sentence_length=4 * CHUNK_BYTES + 64,
            # Sample at most this many ~2 kB chunks (≈ 500 MB): SentencePiece holds its sample in RAM.
            input_sentence_size=250_000,
            shuffle_input_sentence=True,
            train_extremely_large_corpus=False,
            minloglevel=2,
            num_threads=max(1, min(4, os.cpu_count() or 1)),
        )
    except RuntimeError as e:
        raise LmforgeError(
            f"SentencePiece training failed: {e}",
            where="tokenizer_train",
            fix="lower vocab_size (it must fit the corpus; byte fallback needs 256 + 5 ids) or give more text",
        ) from e
    model_path = out_dir / "tokenizer.model"
    model_path.write_bytes(model.getvalue())
    extractor = SentencePieceExtractor(str(model_path))
    vocab = {p.piece: i for i, p in enumerate(extractor.proto.pieces)}
    if model_type == "unigram":
        vocab = [(p.piece, p.score) for p in extractor.proto.pieces]
    return SpmConverter.build_tokenizer_from_spm_proto(proto=extractor.proto, vocab=vocab, legacy=False)


def train_tokenizer(
    files: list[str],
    out_dir: str,
    vocab_size: int = 32000,
    model_type: ModelType = "bpe",
    backend: Backend = "hf",
    *,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    pad_token: str = "<pad>",
    unk_token: str = "<unk>",
    mask_token: str = "<mask>",
    held_out_fraction: float = 0.01,
    held_out_files: list[str] | None = None,
    add_bos_token: bool = False,
    model_max_length: int | None = None,
) -> TokenizerReport:
    """Train a ``bpe``/``unigram`` tokenizer on ``files`` and save it to ``out_dir``.

    Special tokens get ids 0..4 (pad, unk, bos, eos, mask). ``held_out_fraction`` of the
    text (every n-th chunk of ~2 kB) is kept out of training; ``held_out_files`` are held
    out whole (used only for the report). ``add_bos_token`` makes plain ``tokenizer(text)``
    prepend bos; shards add bos/eos themselves, so it defaults off.
    """
    if model_type not in ("bpe", "unigram"):
        raise LmforgeError(f"unknown tokenizer model_type '{model_type}'", where="tokenizer_train.model_type",
                           fix="use one of: bpe, unigram")
    if backend not in ("sentencepiece", "hf"):
        raise LmforgeError(f"unknown tokenizer backend '{backend}'", where="tokenizer_train.backend",
                           fix="use one of: sentencepiece, hf")
    if not 0 <= held_out_fraction < 0.5:
        raise LmforgeError(f"held_out_fraction {held_out_fraction} is out of range",
                           where="tokenizer_train.held_out_fraction", fix="use a value in [0, 0.5), e.g. 0.01")
    special = SpecialTokens(pad=pad_token, unk=unk_token, bos=bos_token, eos=eos_token, mask=mask_token)
    if len(set(special.as_list())) != 5:
        raise LmforgeError("special tokens must be distinct", where="tokenizer_train", fix="rename the duplicates")
    minimum = 256 + 5 + 1
    if vocab_size < minimum:
        raise LmforgeError(f"vocab_size {vocab_size} is too small", where="tokenizer_train.vocab_size",
                           fix=f"use at least {minimum} (256 byte pieces + 5 special tokens + merges)")
    train_files = expand_paths(files, "tokenizer_train.files", what="text file")
    heldout_files = expand_paths(held_out_files or [], "tokenizer_train.held_out_files", what="text file")
    out = Path(out_dir)
    splitter = _Splitter(train_files, heldout_files, held_out_fraction)
    reports: list[TokenizerReport] = []

    def write(tmp: Path) -> None:  # a kill mid-training leaves no half-written tokenizer that pretrain would reuse
        start = time.perf_counter()
        if backend == "hf":
            backend_tok = _train_hf(splitter, vocab_size, model_type, special)
        else:
            backend_tok = _train_sentencepiece(splitter, vocab_size, model_type, special, tmp)
        if add_bos_token:
            from tokenizers.processors import TemplateProcessing

            bos_id = backend_tok.token_to_id(special.bos)
            backend_tok.post_processor = TemplateProcessing(
                single=f"{special.bos} $A", pair=f"{special.bos} $A {special.bos} $B", special_tokens=[(special.bos, bos_id)]
            )
        seconds = time.perf_counter() - start

        from transformers import PreTrainedTokenizerFast

        hf_tok = PreTrainedTokenizerFast(
            tokenizer_object=backend_tok,
            bos_token=special.bos, eos_token=special.eos, pad_token=special.pad,
            unk_token=special.unk, mask_token=special.mask,
            model_max_length=model_max_length or int(1e30),
        )
        hf_tok.save_pretrained(str(tmp))

        # Report on held-out text with the saved tokenizer, so the numbers describe what loads.
        from lmforge.models.load import load_tokenizer  # the one tokenizer loader

        loaded = load_tokenizer(str(tmp))
        heldout_tokens = heldout_words = heldout_chars = 0
        roundtrip = True
        for chunk in splitter.heldout:
            ids = loaded.encode(chunk, add_special_tokens=False)
            heldout_tokens += len(ids)
            heldout_words += len(chunk.split())
            heldout_chars += len(chunk)
            if roundtrip and loaded.decode(ids) != chunk:
                roundtrip = False
        ids_of = {name: loaded.convert_tokens_to_ids(tok) for name, tok in asdict(special).items()}
        report = TokenizerReport(
            out_dir=str(out),
            backend=backend,
            model_type=model_type,
            requested_vocab_size=vocab_size,
            vocab_size=len(loaded),
            seconds=round(seconds, 3),
            train_bytes=splitter.train_bytes,
            heldout_chars=heldout_chars,
            heldout_words=heldout_words,
            heldout_tokens=heldout_tokens,
            tokens_per_word=round(heldout_tokens / heldout_words, 4) if heldout_words else float("nan"),
            chars_per_token=round(heldout_chars / heldout_tokens, 4) if heldout_tokens else float("nan"),
            roundtrip_exact=roundtrip,
            special_token_ids=ids_of,
        )
        (tmp / "lmforge_tokenizer_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        reports.append(report)

    publish_into(out, write)  # into the folder, keeping what else it holds (it may be any folder the user named)
    return reports[0]
