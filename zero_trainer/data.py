"""Pretraining data: corpus -> tokenizer -> token stream (cached) -> packed blocks -> per-rank batches.

Everything expensive (the arrow copy of the corpus, the BPE tokenizer, the token stream) is cached on disk
and built by one process while the others wait on a file lock, so every rank of a run (or two runs sharing a
cache_dir) calls `prepare_data` and gets identical arrays.
"""

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
DOCUMENT_SUFFIXES = (".jsonl", ".parquet", ".txt")
DATA_KEYS = {"path", "tokenizer", "eval_fraction", "max_documents", "format", "chat_template", "train_on_prompt",
             "packing"}
CHAT_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """A problem with the user's data or data config, worded as "what is wrong (where): how to fix"."""


# ---------------------------------------------------------------------------------------------------------
# corpus


def default_corpus_files(max_bytes: int = 8_000_000) -> list[str]:
    """The standard library's own .py files: a corpus every machine has, so training needs no download."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skipped_dirs = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    files, total_bytes = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if skipped_dirs.intersection(path.relative_to(stdlib).parts[:-1]):
            continue
        if total_bytes >= max_bytes:
            break
        files.append(str(path))
        total_bytes += path.stat().st_size
    return files


def load_documents(path: str | list[str] | None, cache_dir: str | None = None) -> datasets.Dataset:
    """Load a corpus as a Dataset with one "text" column, one row per document.

    path is one of
      - None: the standard library's .py files (`default_corpus_files`), one document per file;
      - a .jsonl file of {"text": ...} rows (minimind's pretraining format), one document per row;
      - a .parquet file with a "text" column, one document per row;
      - a .txt file: one document per blank-line-separated paragraph (so one big file still makes many
        documents);
      - a directory written by Dataset.save_to_disk;
      - a directory (searched recursively) or a list of .jsonl/.parquet/.txt files, read in that order of
        type; here each .txt file is one document.
    Text files may start with a UTF-8 BOM and end lines with CRLF; neither reaches the text. Documents that
    are empty or only whitespace are dropped, but a file (or saved dataset) with no text at all is an error,
    as are rows without a string text, binary files and bytes that are not UTF-8: each raises a DataError
    naming the file and line (or row), before anything is cached. cache_dir holds datasets' arrow copies.
    """
    saved = False
    if path is None:
        files = default_corpus_files()
        for file in files:
            _check_lines(file, must_have_text=False)  # the stdlib has empty __init__.py files
        documents = _load_text_files(files, "document", cache_dir)
    elif isinstance(path, (list, tuple)):
        documents = _load_document_files([f for p in path for f in _document_files(p)], "document", cache_dir)
    elif os.path.isdir(path) and _is_saved_dataset(path):
        documents, saved = _load_saved_dataset(path), True
    elif os.path.isdir(path):
        documents = _load_document_files(_document_files(path), "document", cache_dir)
    else:
        documents = _load_document_files(_document_files(path), "paragraph", cache_dir)

    # A saved dataset's filter index would be cached next to its arrow files, inside the user's data directory.
    documents = documents.filter(_is_not_blank, batched=True, keep_in_memory=saved, desc="dropping empty documents")
    if len(documents) == 0:
        raise DataError(f"empty corpus ({path}): no document has any non-whitespace text; point data.path at real text")
    return documents


def _is_not_blank(batch):
    return [bool(text and text.strip()) for text in batch["text"]]


def _document_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(str(f) for f in Path(path).rglob("*") if f.suffix in DOCUMENT_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"no .jsonl/.parquet/.txt files in directory ({path}): "
                            "add some, or point data.path at a file")
        return files
    if not os.path.exists(path):
        raise DataError(f"data path does not exist ({path}): fix data.path, or leave it unset to use the stdlib corpus")
    if Path(path).suffix not in DOCUMENT_SUFFIXES:
        raise DataError(f"unsupported file type ({path}): data.path takes .jsonl, .parquet, .txt or a directory")
    return [path]


def _load_document_files(files: list[str], txt_sample_by: str, cache_dir: str | None) -> datasets.Dataset:
    by_suffix = {suffix: [f for f in files if Path(f).suffix == suffix] for suffix in DOCUMENT_SUFFIXES}
    # Every file is checked before datasets reads any, so a bad file late in a directory leaves no cache behind.
    for file in by_suffix[".jsonl"]:
        _check_lines(file, row_text=_jsonl_text)
    for file in by_suffix[".parquet"]:
        _check_parquet(file)
    for file in by_suffix[".txt"]:
        _check_lines(file)
    parts = []
    if by_suffix[".jsonl"]:
        jsonl = datasets.load_dataset("json", data_files=by_suffix[".jsonl"], split="train", cache_dir=cache_dir)
        parts.append(jsonl.select_columns(["text"]))
    if by_suffix[".parquet"]:
        parts.append(
            datasets.load_dataset(
                "parquet", data_files=by_suffix[".parquet"], columns=["text"], split="train", cache_dir=cache_dir
            )
        )
    if by_suffix[".txt"]:
        parts.append(_load_text_files(by_suffix[".txt"], txt_sample_by, cache_dir))
    # Parquet may store large_string; concatenation needs one schema.
    text_only = datasets.Features({"text": datasets.Value("string")})
    parts = [part if part.features == text_only else part.cast(text_only) for part in parts]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_text_files(files: list[str], sample_by: str, cache_dir: str | None) -> datasets.Dataset:
    # utf-8-sig drops a leading BOM (and reads BOM-less UTF-8 unchanged); text mode turns CRLF into "\n".
    return datasets.load_dataset("text", data_files=files, sample_by=sample_by, encoding="utf-8-sig",
                                 split="train", cache_dir=cache_dir)


def _check_lines(file: str, row_text=None, must_have_text: bool = True) -> None:
    """One cheap pass of our own over a text or JSON-lines file before datasets reads it.

    datasets would fail on a bad line without naming it (an empty file even ends in a StopIteration), or
    store it silently: a missing key as a null text, binary bytes as text. row_text(line, file, line_number)
    returns a JSON line's text; without it each non-blank line counts as text.
    """
    line_number, has_rows, has_text = 0, False, False
    with open(file, "rb") as f:
        # Binary files (images, archives, UTF-16 text) hold NUL bytes, usually early: say so rather than
        # report the first byte that is not UTF-8, as git and grep do.
        head = f.read(8192)
        if b"\0" in head:
            nul = head.index(b"\0")
            _raise_binary(file, head.count(b"\n", 0, nul) + 1, nul - (head.rfind(b"\n", 0, nul) + 1))
        f.seek(0)
        for line_number, raw in enumerate(f, start=1):
            line = _decode_line(raw, file, line_number)
            if line_number == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 BOM; datasets' readers drop it too
            if has_text and row_text is None:
                continue
            if not line or line.isspace():
                continue
            text = row_text(line, file, line_number) if row_text else line
            has_rows, has_text = True, has_text or (bool(text) and not text.isspace())
    if must_have_text and not has_text:
        if line_number == 0:
            raise DataError(f"empty corpus file ({file}:1, 0 bytes): put text in it, or remove it from data.path")
        lines = "1" if line_number == 1 else f"1-{line_number}"
        blank = 'every "text" is blank' if has_rows else "every line is blank"
        raise DataError(f"empty corpus file ({file}:{lines}, {blank}): put text in it, or remove it from data.path")


def _decode_line(raw: bytes, file: str, line_number: int) -> str:
    if b"\0" in raw:
        _raise_binary(file, line_number, raw.index(b"\0"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"bytes that are not UTF-8 ({file}:{line_number}, byte {err.start} of the line): "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _raise_binary(file: str, line_number: int, byte: int):
    raise DataError(
        f"binary data, not text ({file}:{line_number}, NUL byte at byte {byte} of the line): data.path takes "
        "UTF-8 text; remove the file, or if it is UTF-16 text re-encode it (iconv -f utf-16 -t utf-8)"
    )


def _jsonl_text(line: str, file: str, line_number: int) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON ({file}:{line_number}): {err.msg}; "
                        "each line must be one JSON object") from None
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str):
        if not isinstance(row, dict):
            found = f"a JSON {_json_type(row)}, not an object"
        elif "text" in row:
            found = f'"text": {_json_type(text)}'
        else:
            found = f"keys {sorted(row)}"
        raise DataError(
            f'row without a "text" string ({file}:{line_number}, found {found}): '
            'every line must look like {"text": "..."}'
        )
    if "\\u" in line:  # json.loads turns an unpaired \ud800-\udfff escape into a str no tokenizer can encode
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(f'"text" is not valid Unicode ({file}:{line_number}, an unpaired surrogate escape at '
                            f"character {err.start} of the text): drop the escape, or pair it") from None
    return text


def _json_type(value) -> str:
    for kind, name in ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def _check_parquet(file: str) -> None:
    if os.path.getsize(file) == 0:
        raise DataError(f"empty corpus file ({file}, 0 bytes): put rows in it, or remove it from data.path")
    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"not a readable parquet file ({file}): {' '.join(str(err).split()).rstrip('.')}; "
                        "rewrite it (e.g. pandas .to_parquet), or remove it from data.path") from None
    schema = parquet.schema_arrow
    if "text" not in schema.names:
        raise DataError(f'no "text" string column ({file}, columns {schema.names}): rename the text column to "text"')
    if not (pa.types.is_string(schema.field("text").type) or pa.types.is_large_string(schema.field("text").type)):
        raise DataError(f'"text" column holds {schema.field("text").type}, not strings ({file}, column "text"): '
                        "store the documents as strings")
    _check_text_column((batch.column(0) for batch in parquet.iter_batches(columns=["text"])), file)


def _check_text_column(chunks, source: str) -> None:
    """A null text names its row; blank texts are dropped later, but not when every row is blank."""
    rows, has_text = 0, False
    for chunk in chunks:
        if chunk.null_count:
            row = rows + pc.index(chunk.is_null(), True).as_py()
            raise DataError(f'row without a "text" string ({source}, row {row}, found null): '
                            "fill in or drop the rows whose text is null")
        if not has_text and len(chunk):
            has_text = pc.any(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(chunk)), 0)).as_py()
        rows += len(chunk)
    if not has_text:
        what = "0 rows" if rows == 0 else f'rows 0-{rows - 1}, every "text" is blank'
        raise DataError(f"empty corpus file ({source}, {what}): put text in it, or remove it from data.path")


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


def _load_saved_dataset(path: str) -> datasets.Dataset:
    saved = datasets.load_from_disk(path)
    if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved:
            raise DataError(f'saved DatasetDict has no "train" split ({path}, splits {list(saved)}): '
                            "save the train split")
        saved = saved["train"]
    if "text" not in saved.features:
        raise DataError(f'no "text" string column in saved dataset ({path}, columns {saved.column_names}): '
                        'rename the text column to "text"')
    feature = saved.features["text"]
    if feature not in (datasets.Value("string"), datasets.Value("large_string")):
        raise DataError(f'"text" column holds {getattr(feature, "dtype", type(feature).__name__)}, not strings '
                        f'(saved dataset {path}, column "text"): store the documents as strings')
    _check_text_column(saved.data.column("text").chunks, path)
    return saved.select_columns(["text"])


def _corpus_fingerprint(documents: datasets.Dataset) -> str:
    # datasets fingerprints every Dataset already: loaded files by path and mtime (no full read), in-memory
    # data by content, and every .filter/.select applied since (so max_documents is part of it).
    return documents._fingerprint


# ---------------------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizer(
    tokenizer_path: str | None, documents: datasets.Dataset, vocab_size: int, cache_dir: str
) -> PreTrainedTokenizerFast:
    """A local HF tokenizer directory, or (None) a byte-level BPE trained on `documents` and cached.

    The trained tokenizer is saved with save_pretrained, so its directory (tokenizer.name_or_path) can be
    copied next to an exported model. Its special token "<|endoftext|>" is eos, and also bos and pad, as in
    GPT-2: pretraining never pads and only needs the document separator.
    """
    if tokenizer_path is not None:
        return _load_pretrained_tokenizer(tokenizer_path)
    if vocab_size < 257:
        raise DataError(f"vocab_size {vocab_size} too small for a byte-level BPE (model vocab_size): it needs >= 257 "
                        "(256 bytes + <|endoftext|>)")
    key = _hash(_corpus_fingerprint(documents), vocab_size, "bytelevel-bpe-v1")
    tokenizer_dir = os.path.join(cache_dir, f"tokenizer-{key}")
    if not os.path.exists(tokenizer_dir):
        with _exclusive_lock(tokenizer_dir + ".lock"):
            if not os.path.exists(tokenizer_dir):  # another process may have built it while we waited
                shutil.rmtree(tokenizer_dir + ".tmp", ignore_errors=True)  # left by a crashed build
                _train_bpe(documents, vocab_size).save_pretrained(tokenizer_dir + ".tmp")
                os.replace(tokenizer_dir + ".tmp", tokenizer_dir)
    return _load_pretrained_tokenizer(tokenizer_dir)


def _train_bpe(documents: datasets.Dataset, vocab_size: int) -> PreTrainedTokenizerFast:
    logger.info("training a byte-level BPE tokenizer (vocab %d) on %d documents", vocab_size, len(documents))
    started = time.perf_counter()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so no text is ever unknown
        show_progress=False,
    )
    batches = (batch["text"] for batch in documents.iter(batch_size=1000))
    bpe.train_from_iterator(batches, trainer=trainer, length=len(documents))
    logger.info("trained tokenizer in %.1fs", time.perf_counter() - started)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def _load_pretrained_tokenizer(tokenizer_dir: str) -> PreTrainedTokenizerFast:
    if not os.path.isdir(tokenizer_dir):
        raise DataError(f"tokenizer directory does not exist (data.tokenizer={tokenizer_dir}): point it at a "
                        "directory written by save_pretrained, or leave it unset to train one")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load tokenizer (data.tokenizer={tokenizer_dir}): {err}") from None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise DataError(f"not a fast tokenizer (data.tokenizer={tokenizer_dir}): save one with a tokenizer.json")
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer has no eos_token (data.tokenizer={tokenizer_dir}): set eos_token in its "
                        "tokenizer_config.json; documents are separated by it")
    return tokenizer


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    return _hash(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id)


# ---------------------------------------------------------------------------------------------------------
# token stream


def tokenize_corpus(documents: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, cache_dir: str) -> np.ndarray:
    """All documents as one 1-D token stream, each followed by eos; cached as .npy and memory-mapped."""
    key = _token_stream_key(documents, tokenizer)
    stream_path = os.path.join(cache_dir, f"tokens-{key}.npy")
    if not os.path.exists(stream_path):
        with _exclusive_lock(stream_path + ".lock"):
            if not os.path.exists(stream_path):  # another process may have built it while we waited
                _write_token_stream(documents, tokenizer, key, stream_path + ".tmp")
                os.replace(stream_path + ".tmp", stream_path)
    return np.load(stream_path, mmap_mode="r")


def _token_stream_key(documents: datasets.Dataset, tokenizer: PreTrainedTokenizerFast) -> str:
    return _hash(_corpus_fingerprint(documents), _tokenizer_fingerprint(tokenizer))


def _write_token_stream(documents: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, key: str, path: str) -> None:
    logger.info("tokenizing %d documents", len(documents))
    started = time.perf_counter()
    eos_id = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32

    def tokenize(batch):
        # No special tokens, so documents are separated by eos alone whichever post-processor (BOS, ...) the
        # tokenizer carries; verbose=False because long documents are expected, they are packed later.
        encoded = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False, verbose=False)
        return {"input_ids": [ids + [eos_id] for ids in encoded["input_ids"]]}

    tokenized = documents.map(
        tokenize,
        batched=True,
        remove_columns=documents.column_names,
        features=datasets.Features({"input_ids": datasets.List(datasets.Value(np.dtype(dtype).name))}),
        new_fingerprint=key,  # our key already names this result; spares datasets hashing the tokenizer
        # Beside the stream, and deleted once it is written: left to datasets it would stay for good, inside
        # a saved dataset's own directory for that input.
        cache_file_name=path + ".arrow",
        desc="tokenizing",
    )
    ids = tokenized.with_format("arrow")["input_ids"]
    num_tokens = pc.sum(pc.list_value_length(ids)).as_py()
    # Written piece by piece into a memory-mapped .npy, as nanoGPT's prepare.py does, so a corpus larger
    # than RAM still works.
    stream = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(num_tokens,))
    position = 0
    for batch in tokenized.with_format("arrow").iter(batch_size=10_000):
        flat = pc.list_flatten(batch["input_ids"]).to_numpy()
        stream[position : position + len(flat)] = flat
        position += len(flat)
    stream.flush()
    del stream, tokenized, ids
    with contextlib.suppress(FileNotFoundError):
        os.remove(path + ".arrow")
    logger.info("tokenized %d tokens in %.1fs", num_tokens, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------
# blocks and batches


def pack_blocks(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """[N, seq_len] non-overlapping windows of the stream, ragged tail dropped, no padding.

    Labels are input_ids: the HF-style model shifts them itself. A view, so a memory-mapped stream stays on disk.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1 (data.seq_len={seq_len}): set a positive sequence length")
    num_blocks = len(tokens) // seq_len
    return tokens[: num_blocks * seq_len].reshape(num_blocks, seq_len)


def split_train_eval(blocks: np.ndarray, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random held-out blocks; at least one when eval_fraction > 0 and there are >= 2 blocks."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction must be in [0, 1) (data.eval_fraction={eval_fraction}): e.g. 0.05")
    num_blocks = len(blocks)
    num_eval = 0
    if eval_fraction > 0 and num_blocks >= 2:
        num_eval = min(num_blocks - 1, max(1, round(num_blocks * eval_fraction)))
    is_eval = np.zeros(num_blocks, dtype=bool)
    is_eval[np.random.default_rng(seed).permutation(num_blocks)[:num_eval]] = True
    return blocks[~is_eval], blocks[is_eval]


class BatchSampler:
    """Deterministic, resumable data-parallel batches over `num_blocks` training blocks.

    Sample positions are counted globally over the endless sequence perm_0, perm_1, ... where perm_e is a
    permutation of the blocks seeded by (seed, e). Global micro-step k takes positions
    [k * micro_batch * dp_size, (k + 1) * micro_batch * dp_size) and rank r the r-th micro_batch of them.
    So ranks never share a block within an epoch, the global batch does not depend on how it is split across
    ranks, and resuming needs only the step number. (A step that straddles an epoch boundary can hold one
    block twice, once from each epoch, as a single-process loader would.)
    """

    def __init__(self, num_blocks: int, micro_batch: int, dp_rank: int, dp_size: int, seed: int):
        if micro_batch < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"bad batch layout (micro_batch={micro_batch}, dp_rank={dp_rank}, dp_size={dp_size}): "
                            "need micro_batch >= 1 and 0 <= dp_rank < dp_size")
        if num_blocks < micro_batch * dp_size:
            raise DataError(
                f"only {num_blocks} training blocks but one micro-step needs micro_batch * dp_size = "
                f"{micro_batch * dp_size} (data): use a smaller micro batch or seq_len, or more data"
            )
        self.num_blocks, self.micro_batch, self.dp_rank, self.dp_size, self.seed = (
            num_blocks, micro_batch, dp_rank, dp_size, seed)

    def indices(self, global_micro_step: int) -> np.ndarray:
        """Block indices for this rank at this global micro-step."""
        return self.indices_at(global_micro_step * self.dp_size * self.micro_batch)

    @property
    def samples_per_micro_step(self) -> int:
        return self.micro_batch * self.dp_size

    def indices_at(self, position: int) -> np.ndarray:
        """Block indices for this rank for the micro-step starting at global sample `position`.

        Counting in samples, not steps, lets a run resume at another world size or micro batch and read on
        from exactly where the last one stopped.
        """
        first = position + self.dp_rank * self.micro_batch
        epochs, offsets = np.divmod(np.arange(first, first + self.micro_batch), self.num_blocks)
        return np.concatenate(
            [_epoch_permutation(self.num_blocks, self.seed, int(e))[offsets[epochs == e]] for e in np.unique(epochs)]
        )


def eval_indices(batch: int, micro_batch: int, dp_rank: int, dp_size: int, num_blocks: int) -> np.ndarray:
    """The held-out blocks data-parallel rank `dp_rank` reads for eval batch `batch`: consecutive, disjoint across
    ranks, wrapping around (the eval loss is the mean over batches and ranks)."""
    return (np.arange(micro_batch) + (batch * dp_size + dp_rank) * micro_batch) % num_blocks


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


# ---------------------------------------------------------------------------------------------------------
# everything together


@dataclass
class PreparedData:
    train: np.ndarray  # [N, seq_len] token ids (uint16/uint32; cast to int64 for torch)
    eval: np.ndarray  # [M, seq_len]
    tokenizer: PreTrainedTokenizerFast
    tokenizer_dir: str  # a save_pretrained directory, to ship with an exported model
    num_tokens: int  # length of the whole token stream, before packing
    fingerprint: str  # identifies the exact train/eval blocks (corpus, tokenizer, seq_len, split)
    # Rows that are not plain windows of the stream (chat, or data.packing false): per token, its label (-100: not
    # learned, or padding) and its position in its document; None: derived from the eos tokens (document_positions).
    train_labels: np.ndarray | None = None
    eval_labels: np.ndarray | None = None
    train_positions: np.ndarray | None = None
    eval_positions: np.ndarray | None = None
    isolate: bool = True  # documents in one row do not see each other (data.packing's isolation)
    dropped: int = 0  # conversations longer than seq_len, left out
    examples: int = 0  # conversations (chat) or documents kept

    def batch(self, split: str, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input ids, positions, next-token targets) of rows `indices` (sorted) of "train" or "eval", int64 [B, T]:
        what the model trains on. Positions restart at every document, so attention can keep documents apart;
        a target is -100 where its token is not learned, where the next token starts another document, and at
        the row's end."""
        rows = np.sort(np.asarray(indices))
        ids = np.asarray(getattr(self, split)[rows], dtype=np.int64)
        labels = getattr(self, f"{split}_labels")
        if labels is None:  # plain windows of the stream: documents end at eos
            eos = self.tokenizer.eos_token_id
            positions = document_positions(ids, eos) if self.isolate else np.broadcast_to(
                np.arange(ids.shape[1]), ids.shape).copy()
            return ids, positions, next_token_targets(ids, positions if self.isolate else None)
        positions = np.asarray(getattr(self, f"{split}_positions")[rows], dtype=np.int64)
        return ids, positions, next_token_targets(np.asarray(labels[rows], dtype=np.int64), positions)


def document_positions(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Each token's position in its document, for rows of packed documents that end at eos: 0 at the row's start
    and after every eos."""
    start = np.zeros(ids.shape, dtype=bool)
    start[:, 0] = True
    start[:, 1:] = ids[:, :-1] == eos_id
    index = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return index - np.maximum.accumulate(np.where(start, index, 0), axis=1)


def next_token_targets(labels: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """targets[t] = labels[t + 1] (the next token, or -100 where it is not learned); -100 at the row's end and,
    given positions, where the next token starts a new document (a document's first token is not predicted from
    the one before it)."""
    targets = np.full(labels.shape, -100, dtype=np.int64)
    targets[:, :-1] = labels[:, 1:]
    if positions is not None:
        targets[:, :-1][positions[:, 1:] == 0] = -100
    return targets


def prepare_data(data_cfg: dict, vocab_size: int, seq_len: int, seed: int, cache_dir: str) -> PreparedData:
    """Corpus -> tokenizer -> token stream -> train/eval blocks, with every expensive step cached in cache_dir.

    data_cfg keys (all optional): path, tokenizer, eval_fraction (0.05), max_documents (None = all).
    """
    unknown = sorted(set(data_cfg) - DATA_KEYS)
    if unknown:
        raise DataError(f"unknown data keys {unknown} (data): the known ones are {sorted(DATA_KEYS)}")
    eval_fraction = data_cfg.get("eval_fraction", 0.05)
    max_documents = data_cfg.get("max_documents")
    os.makedirs(cache_dir, exist_ok=True)
    if data_cfg.get("format", "text") == "chat":
        return prepare_chat(data_cfg, vocab_size, seq_len, seed, cache_dir)

    documents = load_documents(data_cfg.get("path"), cache_dir=os.path.join(cache_dir, "datasets"))
    if max_documents is not None:
        if not isinstance(max_documents, int) or max_documents < 1:
            raise DataError(f"max_documents must be a positive integer (data.max_documents={max_documents}): "
                            "set one, or unset it to use every document")
        documents = documents.select(range(min(max_documents, len(documents))))

    tokenizer = load_tokenizer(data_cfg.get("tokenizer"), documents, vocab_size, cache_dir)
    if len(tokenizer) > vocab_size:
        where = data_cfg.get("tokenizer")
        raise DataError(
            f"tokenizer vocab {len(tokenizer)} > model vocab_size {vocab_size} (data.tokenizer"
            + (f"={where}" if where else "") + "): its ids past the embedding would index out of range: use a "
            f"tokenizer with at most {vocab_size} tokens or a model with vocab_size >= {len(tokenizer)}"
        )

    tokens = tokenize_corpus(documents, tokenizer, cache_dir)
    packing = data_cfg.get("packing", True)
    if packing:
        blocks = pack_blocks(tokens, seq_len)
        rows = {"ids": blocks}
    else:
        key = _hash(_token_stream_key(documents, tokenizer), seq_len)
        rows = _cached_rows(os.path.join(cache_dir, f"padded-{key}"),
                            lambda: pad_documents(tokens, seq_len, tokenizer.eos_token_id))
        blocks = rows["ids"]
    if len(blocks) < 2:
        raise DataError(
            f"corpus too small: {len(tokens)} tokens make {len(blocks)} blocks of seq_len {seq_len} (data.seq_len): "
            "use a smaller seq_len or more data (at least 2 blocks are needed for train and eval)"
        )
    split = {name: split_train_eval(array, eval_fraction, seed) for name, array in rows.items()}
    return PreparedData(
        train=split["ids"][0],
        eval=split["ids"][1],
        tokenizer=tokenizer,
        tokenizer_dir=tokenizer.name_or_path,
        num_tokens=len(tokens),
        fingerprint=_hash(_token_stream_key(documents, tokenizer), seq_len, eval_fraction, seed,
                          *([] if packing else ["padded"])),
        **({} if packing else {"train_labels": split["labels"][0], "eval_labels": split["labels"][1],
                               "train_positions": split["positions"][0], "eval_positions": split["positions"][1]}),
        isolate=True,
        examples=len(documents),
    )


def pad_documents(tokens: np.ndarray, seq_len: int, eos_id: int) -> dict[str, np.ndarray]:
    """data.packing false: each document (with its eos) in rows of its own, cut at seq_len, the last padded with eos
    tokens that are not learned. {"ids", "labels", "positions"}, [N, seq_len] each; positions run on through the
    padding (nothing real attends to it, causal attention looks back only), so a row is one sequence to attention."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id) + 1
    starts = np.concatenate([[0], ends[:-1]])
    pieces = [(s, min(s + seq_len, e)) for s, e in zip(starts, ends, strict=True) for s in range(s, e, seq_len)]
    ids = np.full((len(pieces), seq_len), eos_id, dtype=np.int64)
    labels = np.full((len(pieces), seq_len), -100, dtype=np.int32)
    positions = np.zeros((len(pieces), seq_len), dtype=np.int32)
    positions[:] = np.arange(seq_len)
    for row, (a, b) in enumerate(pieces):
        ids[row, : b - a] = tokens[a:b]
        labels[row, : b - a] = tokens[a:b]
    return {"ids": ids.astype(tokens.dtype), "labels": labels, "positions": positions}


def _cached_rows(path: str, build) -> dict[str, np.ndarray]:
    """Arrays built once and kept as an .npz in the cache (the first caller builds, others wait)."""
    file = path + ".npz"
    if not os.path.exists(file):
        with _exclusive_lock(file + ".lock"):
            if not os.path.exists(file):
                arrays = build()
                np.savez(file + ".tmp.npz", **arrays)
                os.replace(file + ".tmp.npz", file)
    with np.load(file) as saved:
        return {name: saved[name] for name in saved.files}


# ---------------------------------------------------------------------------------------------------------
# chat


def prepare_chat(data_cfg: dict, vocab_size: int, seq_len: int, seed: int, cache_dir: str) -> PreparedData:
    """data.format chat: conversations -> one messages list each (chat.normalize) -> token ids and what to learn
    (chat.encode, the tokenizer's or data.chat_template's template) -> rows of seq_len: several whole conversations a
    row (packing), positions restarting at each, or one a row, padded. Conversations longer than seq_len are left
    out and counted. Cached like the token stream."""
    from . import chat

    path, tokenizer_path = data_cfg.get("path"), data_cfg.get("tokenizer")
    if path is None:
        raise DataError("data.format chat needs conversations (data.path): point it at a .jsonl/.json file or a "
                        "directory of them")
    if tokenizer_path is None:
        raise DataError("data.format chat needs the model's tokenizer (data.tokenizer): use model.pretrained (its "
                        "tokenizer comes with it) or set data.tokenizer")
    tokenizer = _load_pretrained_tokenizer(tokenizer_path)
    if len(tokenizer) > vocab_size:
        raise DataError(f"tokenizer vocab {len(tokenizer)} > model vocab_size {vocab_size} (data.tokenizer="
                        f"{tokenizer_path}): use the tokenizer the model was trained with")
    template = _chat_template(data_cfg.get("chat_template"), tokenizer, tokenizer_path)
    files = _chat_files(path)
    train_on_prompt, packing = bool(data_cfg.get("train_on_prompt", False)), data_cfg.get("packing", True)
    eval_fraction, max_documents = data_cfg.get("eval_fraction", 0.05), data_cfg.get("max_documents")
    key = _hash(*[(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files], _tokenizer_fingerprint(tokenizer),
                template, train_on_prompt, packing, seq_len, eval_fraction, seed, max_documents, "chat-v1")

    def build():
        encoded, dropped = [], 0
        for where, row in _conversations(files, max_documents):
            try:
                ids, learn = chat.encode(tokenizer, template, chat.normalize(row), train_on_prompt)
            except chat.ChatError as err:
                raise DataError(f"{err} ({where})") from None
            if len(ids) > seq_len:
                dropped += 1
                continue
            encoded.append((ids, learn))
        if len(encoded) < 2:
            raise DataError(f"{len(encoded)} conversation(s) fit in data.seq_len {seq_len} ({path}; {dropped} longer "
                            "ones left out): use a longer seq_len or more conversations (2 at least: train and eval)")
        order = np.random.default_rng(seed).permutation(len(encoded))
        num_eval = min(len(encoded) - 1, max(1, round(len(encoded) * eval_fraction)))
        parts = {"train": [encoded[i] for i in sorted(order[num_eval:])],
                 "eval": [encoded[i] for i in sorted(order[:num_eval])]}
        arrays = {f"{split}_{name}": value for split, convs in parts.items()
                  for name, value in chat_rows(convs, seq_len, tokenizer.eos_token_id, packing).items()}
        return {**arrays, "stats": np.array([len(encoded), dropped, sum(len(c[0]) for c in encoded)])}

    rows = _cached_rows(os.path.join(cache_dir, f"chat-{key}"), build)
    examples, dropped, num_tokens = (int(x) for x in rows["stats"])
    return PreparedData(
        train=rows["train_ids"], eval=rows["eval_ids"], tokenizer=tokenizer, tokenizer_dir=tokenizer.name_or_path,
        num_tokens=num_tokens, fingerprint=key, train_labels=rows["train_labels"], eval_labels=rows["eval_labels"],
        train_positions=rows["train_positions"], eval_positions=rows["eval_positions"], isolate=True,
        dropped=dropped, examples=examples)


def chat_rows(conversations: list[tuple[list, list]], seq_len: int, pad_id: int, packing: bool) -> dict:
    """(ids, learn) conversations -> [N, seq_len] ids, labels (the token where learned, else -100) and positions:
    packing puts whole conversations one after another while they fit (in order), else one a row; the rest of a
    row is padding (pad_id, not learned, its positions running on from the last conversation's: causal attention
    never looks forward, so nothing real sees it, and an unpacked row stays one sequence to attention)."""
    rows, current = [], []
    for conv in conversations:
        if current and (not packing or sum(len(c[0]) for c in current) + len(conv[0]) > seq_len):
            rows.append(current)
            current = []
        current.append(conv)
    if current:
        rows.append(current)
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), -100, dtype=np.int64)
    positions = np.zeros((len(rows), seq_len), dtype=np.int64)
    for r, convs in enumerate(rows):
        t = 0
        for conv_ids, learn in convs:
            n = len(conv_ids)
            ids[r, t:t + n] = conv_ids
            labels[r, t:t + n] = np.where(learn, conv_ids, -100)
            positions[r, t:t + n] = np.arange(n)
            t += n
        positions[r, t:] = np.arange(n, n + seq_len - t)
    return {"ids": ids, "labels": labels, "positions": positions}


def _chat_template(name_or_path: str | None, tokenizer, tokenizer_path: str) -> str:
    from .chat import TEMPLATES

    if name_or_path is None:
        if not tokenizer.chat_template:
            raise DataError(f"the tokenizer ({tokenizer_path}) has no chat_template (data.chat_template): set "
                            "data.chat_template to a .jinja file, or to chatml (built in)")
        return tokenizer.chat_template
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    if not os.path.isfile(name_or_path):
        raise DataError(f"chat template file not found (data.chat_template={name_or_path}): give a .jinja file or "
                        f"one of: {', '.join(TEMPLATES)}")
    with open(name_or_path, encoding="utf-8") as f:
        return f.read()


def _chat_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(str(f) for f in Path(path).rglob("*") if f.suffix in CHAT_SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"no .jsonl/.json files in directory ({path}): add some, or point data.path at a file")
        return files
    if not os.path.exists(path):
        raise DataError(f"data path does not exist ({path}): fix data.path")
    if Path(path).suffix not in CHAT_SUFFIXES:
        raise DataError(f"unsupported file type for chat data ({path}): data.path takes .jsonl or .json (an array "
                        "of conversations) or a directory of them")
    return [path]


def _conversations(files: list[str], limit: int | None):
    """(where, row) of every conversation: a JSON object per line of a .jsonl file ("FILE:LINE"), or the items of a
    .json array ("FILE, item I")."""
    count = 0
    for file in files:
        with open(file, "rb") as f:
            raw = f.read()
        if b"\0" in raw:
            nul = raw.index(b"\0")
            _raise_binary(file, raw.count(b"\n", 0, nul) + 1, nul - (raw.rfind(b"\n", 0, nul) + 1))
        if file.endswith(".json"):
            text = _decode_line(raw, file, 1).removeprefix("\ufeff")
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"invalid JSON ({file}:{err.lineno}): {err.msg}; a .json file holds one array of "
                                "conversations") from None
            if not isinstance(rows, list):
                raise DataError(f"a .json chat file holds one array of conversations ({file}:1, found a JSON "
                                f"{_json_type(rows)})")
            items = [(f"{file}, item {i}", row) for i, row in enumerate(rows)]
        else:
            items = []
            for number, line in enumerate(raw.split(b"\n"), start=1):
                text = _decode_line(line, file, number).removeprefix("\ufeff" if number == 1 else "")
                if not text.strip():
                    continue
                try:
                    items.append((f"{file}:{number}", json.loads(text)))
                except json.JSONDecodeError as err:
                    raise DataError(f"invalid JSON ({file}:{number}): {err.msg}; each line must be one JSON "
                                    "conversation") from None
        for item in items:
            if limit is not None and count >= limit:
                return
            count += 1
            yield item


# ---------------------------------------------------------------------------------------------------------
# cache helpers


def _hash(*parts) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _exclusive_lock(lock_path: str):
    """One process at a time (any rank, any run on this machine) builds a cache entry; the others wait."""
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file is closed, even on a crash
        yield
