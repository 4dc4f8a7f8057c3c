"""Tests for zero_trainer.data: corpus loading, tokenizer and token caches, packing, batch sampling."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zero_trainer import data
from zero_trainer.data import BatchSampler, DataError

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text, emoji 🚀 and tabs\tand\nnewlines.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "import os\nprint(os.getcwd())\n",
] * 4


@pytest.fixture
def documents():
    return datasets.Dataset.from_dict({"text": DOCS})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# loading


def test_load_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t, "source": "x"} for t in DOCS])
    documents = data.load_documents(path, cache_dir=str(tmp_path / "hf"))
    assert documents.column_names == ["text"]
    assert list(documents["text"]) == DOCS


def test_load_txt_splits_paragraphs(tmp_path):
    (tmp_path / "c.txt").write_text("first doc\nstill first\n\nsecond doc\n\n\nthird doc\n", encoding="utf-8")
    documents = data.load_documents(str(tmp_path / "c.txt"), cache_dir=str(tmp_path / "hf"))
    assert [t.strip() for t in documents["text"]] == ["first doc\nstill first", "second doc", "third doc"]


def test_load_parquet(tmp_path):
    pq.write_table(pa.table({"text": DOCS, "id": list(range(len(DOCS)))}), tmp_path / "c.parquet")
    documents = data.load_documents(str(tmp_path / "c.parquet"), cache_dir=str(tmp_path / "hf"))
    assert documents.column_names == ["text"]
    assert list(documents["text"]) == DOCS


def test_load_saved_dataset(tmp_path):
    datasets.Dataset.from_dict({"text": DOCS, "meta": [0] * len(DOCS)}).save_to_disk(str(tmp_path / "saved"))
    documents = data.load_documents(str(tmp_path / "saved"))
    assert list(documents["text"]) == DOCS


def test_load_directory_and_list_of_files(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_jsonl(corpus / "a.jsonl", [{"text": "row one"}, {"text": "row two"}])
    pq.write_table(pa.table({"text": ["parquet row"]}), corpus / "b.parquet")
    (corpus / "sub" / "c.txt").write_text("whole file\n\nis one document\n", encoding="utf-8")
    (corpus / "README.md").write_text("ignored", encoding="utf-8")
    expected = {"row one", "row two", "parquet row", "whole file\n\nis one document\n"}

    documents = data.load_documents(str(corpus), cache_dir=str(tmp_path / "hf"))
    assert set(documents["text"]) == expected and len(documents) == 4

    files = [str(corpus / "a.jsonl"), str(corpus / "b.parquet"), str(corpus / "sub" / "c.txt")]
    assert set(data.load_documents(files, cache_dir=str(tmp_path / "hf"))["text"]) == expected


def test_default_corpus_is_capped_stdlib_source():
    files = data.default_corpus_files()
    assert files == data.default_corpus_files()  # deterministic
    assert files == sorted(files) and all(f.endswith(".py") for f in files)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in Path(f).parts)
    total_mb = sum(os.path.getsize(f) for f in files) / 1e6
    assert 1 < total_mb < 9


def test_default_corpus_prepares_with_max_documents(tmp_path):
    prepared = data.prepare_data({"max_documents": 8}, vocab_size=512, seq_len=64, seed=0, cache_dir=str(tmp_path))
    assert prepared.train.shape[1] == 64 and len(prepared.eval) >= 1
    assert len(prepared.tokenizer) <= 512
    assert os.path.exists(os.path.join(prepared.tokenizer_dir, "tokenizer.json"))


# ---------------------------------------------------------------------------------------------------------
# loading errors


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_documents(str(tmp_path / "nope.jsonl"))


def test_unsupported_extension(tmp_path):
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported file type"):
        data.load_documents(str(tmp_path / "c.csv"))


def test_jsonl_row_without_text_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, {"text": "ok"}, {"body": "no text"}])
    with pytest.raises(DataError, match=rf"{path}:3\b.*body"):
        data.load_documents(path)


def test_invalid_utf8_names_file_and_line(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(DataError, match=rf"UTF-8 \({txt}:3\b"):
        data.load_documents(str(txt))

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "bad \xc3\x28"}\n')
    with pytest.raises(DataError, match=rf"UTF-8 \({jsonl}:2\b"):
        data.load_documents(str(jsonl))


def test_empty_corpus(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": ""}, {"text": "  \n "}])
    with pytest.raises(DataError, match="empty corpus"):
        data.load_documents(path, cache_dir=str(tmp_path / "hf"))


# ---------------------------------------------------------------------------------------------------------
# tokenizer and token stream


def test_tokenizer_cached_and_identical(tmp_path, documents, monkeypatch):
    first = data.load_tokenizer(None, documents, vocab_size=300, cache_dir=str(tmp_path))
    assert first.eos_token == "<|endoftext|>" and len(first) <= 300
    assert first.name_or_path.startswith(str(tmp_path))

    monkeypatch.setattr(data, "_train_bpe", lambda *args: pytest.fail("tokenizer trained again"))
    second = data.load_tokenizer(None, documents, vocab_size=300, cache_dir=str(tmp_path))
    assert second.name_or_path == first.name_or_path
    for text in DOCS[:5]:
        assert first(text)["input_ids"] == second(text)["input_ids"]
        assert second.decode(second(text)["input_ids"]) == text  # byte-level: lossless


def test_token_stream_cached(tmp_path, documents, monkeypatch):
    tokenizer = data.load_tokenizer(None, documents, vocab_size=300, cache_dir=str(tmp_path))
    first = data.tokenize_corpus(documents, tokenizer, str(tmp_path))
    assert first.dtype == np.uint16 and first.ndim == 1

    monkeypatch.setattr(data, "_write_token_stream", lambda *args: pytest.fail("tokenized again"))
    second = data.tokenize_corpus(documents, tokenizer, str(tmp_path))
    assert isinstance(second, np.memmap)
    np.testing.assert_array_equal(first, second)


def test_stream_is_documents_separated_by_eos(tmp_path, documents):
    tokenizer = data.load_tokenizer(None, documents, vocab_size=300, cache_dir=str(tmp_path))
    tokens = np.asarray(data.tokenize_corpus(documents, tokenizer, str(tmp_path)))
    eos_positions = np.flatnonzero(tokens == tokenizer.eos_token_id)
    assert len(eos_positions) == len(DOCS) and eos_positions[-1] == len(tokens) - 1
    pieces = np.split(tokens, eos_positions[:-1] + 1)
    assert [tokenizer.decode(piece[:-1]) for piece in pieces] == DOCS


def test_pack_blocks_has_no_padding(tmp_path, documents):
    tokenizer = data.load_tokenizer(None, documents, vocab_size=300, cache_dir=str(tmp_path))
    tokens = data.tokenize_corpus(documents, tokenizer, str(tmp_path))
    seq_len = 16
    blocks = data.pack_blocks(tokens, seq_len)
    assert blocks.shape == (len(tokens) // seq_len, seq_len)
    # every block is a window of real tokens, in order; only the ragged tail is dropped
    np.testing.assert_array_equal(blocks.reshape(-1), tokens[: blocks.size])
    assert len(tokens) - blocks.size < seq_len
    assert (blocks == tokenizer.eos_token_id).sum() >= len(DOCS) - 1  # separators survive packing


def test_split_train_eval():
    blocks = np.arange(100 * 4).reshape(100, 4)
    train, held_out = data.split_train_eval(blocks, 0.05, seed=1)
    assert len(train) == 95 and len(held_out) == 5
    assert not set(train[:, 0]) & set(held_out[:, 0])
    again_train, again_eval = data.split_train_eval(blocks, 0.05, seed=1)
    np.testing.assert_array_equal(held_out, again_eval)
    assert len(data.split_train_eval(blocks[:2], 0.01, seed=1)[1]) == 1  # at least one eval block


def test_prepare_data_end_to_end_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS])
    cfg = {"path": path, "eval_fraction": 0.1}
    prepared = data.prepare_data(cfg, vocab_size=300, seq_len=8, seed=0, cache_dir=str(tmp_path / "cache"))
    assert prepared.train.shape[1] == 8 and len(prepared.eval) >= 1
    assert (len(prepared.train) + len(prepared.eval)) * 8 <= prepared.num_tokens
    again = data.prepare_data(cfg, vocab_size=300, seq_len=8, seed=0, cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(prepared.train, again.train)
    assert prepared.fingerprint == again.fingerprint

    with pytest.raises(DataError, match=r"tokenizer vocab \d+ > model vocab_size 280 \(data.tokenizer="):
        data.prepare_data({**cfg, "tokenizer": prepared.tokenizer_dir}, 280, 8, 0, str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"\d+ tokens make 0 blocks.*seq_len"):
        data.prepare_data(cfg, vocab_size=300, seq_len=100_000, seed=0, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="unknown data keys"):
        data.prepare_data({"pth": path}, 300, 8, 0, str(tmp_path / "cache"))
    with pytest.raises(DataError, match="tokenizer directory does not exist"):
        data.prepare_data({**cfg, "tokenizer": str(tmp_path / "no-tok")}, 300, 8, 0, str(tmp_path / "cache"))


def test_editing_the_corpus_invalidates_caches(tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"text": t} for t in DOCS])
    before = data.prepare_data({"path": str(path)}, 300, 8, 0, str(tmp_path / "cache"))
    write_jsonl(path, [{"text": t} for t in DOCS[:5]])
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse-mtime filesystem still sees it
    after = data.prepare_data({"path": str(path)}, 300, 8, 0, str(tmp_path / "cache"))
    assert after.fingerprint != before.fingerprint and after.tokenizer_dir != before.tokenizer_dir
    assert after.num_tokens < before.num_tokens
    capped = data.prepare_data({"path": str(path), "max_documents": 2}, 300, 8, 0, str(tmp_path / "cache"))
    assert capped.fingerprint != after.fingerprint and capped.num_tokens < after.num_tokens


def test_concurrent_builders_build_once(tmp_path):
    """Two processes (two ranks, or two runs sharing a cache) racing for the same caches build them once."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in DOCS])
    script = textwrap.dedent(f"""
        import logging, os, sys, time
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from zero_trainer import data
        open(os.path.join({str(tmp_path)!r}, "ready-" + sys.argv[1]), "w").close()
        while len([f for f in os.listdir({str(tmp_path)!r}) if f.startswith("ready-")]) < 2:
            time.sleep(0.01)  # start together, so the file lock is really contended
        prepared = data.prepare_data({{"path": {path!r}}}, 300, 8, 0, {str(tmp_path / "cache")!r})
        print("train-sum", int(prepared.train.astype("int64").sum()))
    """)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    log = "".join(outputs)
    assert log.count("training a byte-level BPE") == 1 and log.count("tokenizing 20 documents") == 1, log
    sums = {line for out in outputs for line in out.splitlines() if line.startswith("train-sum")}
    assert len(sums) == 1


# ---------------------------------------------------------------------------------------------------------
# batch sampler


def test_sampler_ranks_disjoint_and_deterministic():
    num_blocks, micro_batch, world = 24, 3, 4  # 24 = 2 steps per epoch exactly, so no step straddles
    for step in range(10):
        per_rank = [BatchSampler(num_blocks, micro_batch, r, world, seed=7).indices(step) for r in range(world)]
        flat = np.concatenate(per_rank)
        assert len(set(flat.tolist())) == micro_batch * world  # disjoint
        again = BatchSampler(num_blocks, micro_batch, 2, world, seed=7).indices(step)
        np.testing.assert_array_equal(per_rank[2], again)  # a fresh sampler (a resumed run) agrees
    other_seed = BatchSampler(num_blocks, micro_batch, 0, world, seed=8).indices(0)
    assert not np.array_equal(BatchSampler(num_blocks, micro_batch, 0, world, seed=7).indices(0), other_seed)


def test_sampler_global_batch_independent_of_world_size():
    num_blocks = 37
    for step in range(30):
        two_ranks = np.concatenate([BatchSampler(num_blocks, 2, r, 2, seed=3).indices(step) for r in range(2)])
        one_rank = BatchSampler(num_blocks, 4, 0, 1, seed=3).indices(step)
        np.testing.assert_array_equal(two_ranks, one_rank)


def test_sampler_epochs_cover_every_block_once():
    num_blocks, micro_batch, world = 10, 2, 2  # 4 samples per step: steps straddle epoch boundaries
    samplers = [BatchSampler(num_blocks, micro_batch, r, world, seed=0) for r in range(world)]
    seen = np.concatenate([sampler.indices(step) for step in range(10) for sampler in samplers])
    epochs = seen.reshape(4, num_blocks)  # 40 samples = 4 epochs
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(num_blocks))
    assert len({tuple(epoch) for epoch in epochs}) == 4  # each epoch reshuffled


def test_sampler_needs_enough_blocks():
    with pytest.raises(DataError, match="micro_batch \\* dp_size = 8"):
        BatchSampler(num_blocks=7, micro_batch=4, dp_rank=0, dp_size=2, seed=0)
