"""Bad data as a matrix, not a list: every input form data.path takes x every way a file goes wrong.

A fault either must train (the documents load with the right text, and prepare_data tokenizes them whole) or
must fail with a one-line DataError naming the file and its line (row, for parquet and saved datasets) before
anything is cached. A form x fault pair that cannot exist (CRLF in parquet, a BOM in a saved dataset) is left
out of the tables below rather than skipped.
"""

import json
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zero_trainer import data
from zero_trainer.data import DataError

GOOD = [
    "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun.",
    "def add(a, b):\n    return a + b  # two lines in one document",
    "Ünïcödé text, an emoji 🚀 and a tab\there; pack my box with five dozen liquor jugs.",
]
BIG = ("lorem ipsum dolor sit amet, consectetur adipiscing elit " * 90_000)[:5_000_000]  # one 5 MB line
BOM = b"\xef\xbb\xbf"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256))  # NUL first on line 3
STRING = datasets.Features({"text": datasets.Value("string")})


def rows(texts) -> bytes:
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()


def paragraphs(texts) -> bytes:
    return ("\n\n".join(texts) + "\n").encode()


# form -> fault -> (what the file holds, what must happen). A list of documents: it must train and load as
# those; an int or ":a-b": it must fail naming that line (or lines) as file:line; another str: it must fail
# naming the file and that (a row, or the column or size for a fault that concerns no single row).
JSONL = {
    "bom": (BOM + rows(GOOD), GOOD),
    "crlf": (rows(GOOD).replace(b"\n", b"\r\n"), GOOD),
    "ascii escapes": ("".join(json.dumps({"text": t}) + "\n" for t in GOOD).encode(), GOOD),  # 🚀 as a pair
    "enormous line": (rows([GOOD[0], BIG]), [GOOD[0], BIG]),
    "blank row among good": (rows([GOOD[0], " \n\t", GOOD[1]]) + b"\n  \n" + rows(GOOD[2:]), GOOD),
    "empty file": (b"", 1),
    "blank lines": (b"\n   \n\t\n\n", ":1-4"),
    "blank texts": (rows(["", "  \n ", "\t"]), ":1-3"),
    "array row": (rows(GOOD[:1]) + b"[1, 2]\n", 2),
    "string row": (rows(GOOD[:1]) + b'"a string"\n', 2),
    "number row": (rows(GOOD[:1]) + b"42\n", 2),
    "no text key": (rows(GOOD[:1]) + b'{"body": "x"}\n', 2),
    "number text": (rows(GOOD[:1]) + b'{"text": 5}\n', 2),
    "null text": (rows(GOOD[:1]) + b'{"text": null}\n', 2),
    "png": (PNG, 3),
    "nul byte": (rows(GOOD * 60) + b'{"text": "a\x00b"}\n', len(GOOD) * 60 + 1),  # past the 8 KB sniffed first
    "latin-1": (rows(GOOD[:1]) + '{"text": "café"}\n'.encode("latin-1"), 2),
    "lone surrogate": (rows(GOOD[:1]) + b'{"text": "paired \\ud83d\\ude80, lone \\ud800"}\n', 2),
}
TXT = {
    "bom": (BOM + paragraphs(GOOD), GOOD),
    "crlf": (paragraphs(GOOD).replace(b"\n", b"\r\n"), GOOD),
    "enormous line": (paragraphs([GOOD[0], BIG]), [GOOD[0], BIG]),
    "blank row among good": (paragraphs([GOOD[0], "  \t", *GOOD[1:]]), GOOD),
    "empty file": (b"", 1),
    "blank lines": (b"\n   \n\t\n\n", ":1-4"),
    "png": (PNG, 3),
    "nul byte": (paragraphs(GOOD * 60) + b"a\x00b\n", len(paragraphs(GOOD * 60).splitlines()) + 1),
    "latin-1": (paragraphs(GOOD[:1]) + "café\n".encode("latin-1"), 2),
}


def table(texts, arrow_type=None):
    return pa.table({"text": pa.array(texts, arrow_type or pa.string())})


PARQUET = {
    "enormous row": (table([GOOD[0], BIG]), [GOOD[0], BIG]),
    "large_string column": (table(GOOD, pa.large_string()), GOOD),
    "blank row among good": (table([GOOD[0], "", " \n", *GOOD[1:]]), GOOD),
    "empty file": (b"", "0 bytes"),
    "no rows": (table([]), "0 rows"),
    "blank texts": (table(["", "  \n ", "\t"]), "rows 0-2"),
    "no text column": (pa.table({"body": GOOD}), "columns ['body']"),
    "number column": (pa.table({"text": [1, 2]}), 'column "text"'),
    "bytes column": (pa.table({"text": pa.array([b"caf\xe9"], pa.binary())}), 'column "text"'),
    "null text": (table([*GOOD, GOOD[0], None]), "row 4"),  # in the third row group: rows are counted across
    "not parquet": (PNG, "not a readable parquet file"),
}
SAVED = {
    "enormous row": ({"text": [GOOD[0], BIG]}, [GOOD[0], BIG]),
    "blank row among good": ({"text": [GOOD[0], "", " \n", *GOOD[1:]]}, GOOD),
    "no rows": ({"text": []}, "0 rows"),
    "blank texts": ({"text": ["", "  \n ", "\t"]}, "rows 0-2"),
    "no text column": ({"body": GOOD}, "columns ['body']"),
    "number column": ({"text": [1, 2]}, 'column "text"'),
    "null text": ({"text": [*GOOD, GOOD[0], None]}, "row 4"),  # in the second shard
}
FORMS = {"jsonl": JSONL, "txt": TXT, "parquet": PARQUET, "saved": SAVED}
# A directory of files: the faulty file (in a subdirectory) next to a good one; each .txt is one document there.
IN_DIRECTORY = ("jsonl", "txt", "parquet")
CASES = [(form, fault) for form, faults in FORMS.items() for fault in faults]
CASES += [(f"directory/{form}", fault) for form in IN_DIRECTORY for fault in FORMS[form]]


def write_input(root: Path, form: str, fault: str):
    """Writes the case under root; returns (data.path, the faulty file, expected documents or error location)."""
    inner = form.removeprefix("directory/")
    content, expected = FORMS[inner][fault]
    if inner == "saved":
        path = root / "saved"
        strings = "text" in content and all(t is None or isinstance(t, str) for t in content["text"])
        dataset = datasets.Dataset.from_dict(content, features=STRING if strings else None)
        dataset.save_to_disk(str(path), num_shards=2 if len(dataset) > 2 else 1)
        return path, path, expected

    directory = form.startswith("directory/")
    file = root / ("sub" if directory else "") / f"corpus.{inner}"
    file.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        pq.write_table(content, file, row_group_size=2)
    if not directory:
        return file, file, expected
    good = "a good document next to the faulty file"
    (root / "good.jsonl").write_bytes(rows([good]))
    if isinstance(expected, list):
        if inner == "txt":  # a whole .txt file is one document here
            expected = [content.decode("utf-8-sig").replace("\r\n", "\n")]
        expected = [good, *expected]
    return root, file, expected


def files_under(path: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("form", "fault"), CASES, ids=[f"{form}-{fault}".replace(" ", "_") for form, fault in CASES])
def test_bad_data_matrix(form, fault, tmp_path):
    path, file, expected = write_input(tmp_path / "input", form, fault)
    inputs_before = files_under(tmp_path / "input")
    cache = tmp_path / "cache"

    if isinstance(expected, list):
        documents = data.load_documents(str(path), cache_dir=str(cache / "datasets"))
        texts = list(documents["text"])
        assert not any("\ufeff" in t or "\r" in t for t in texts)
        # .txt paragraphs keep the file's last newline; the directory form reads its files by type, not name
        assert sorted(t.strip() for t in texts) == sorted(t.strip() for t in expected)
        if max(map(len, texts)) < len(BIG):  # the enormous document goes through the tokenizer once, below
            assert_tokenized_whole(path, texts, cache)
    else:
        with pytest.raises(DataError) as raised:
            data.prepare_data({"path": str(path)}, vocab_size=300, seq_len=32, seed=0, cache_dir=str(cache))
        message = str(raised.value)
        assert "\n" not in message and "\r" not in message, message
        assert re.fullmatch(r"[^()]+ \(.+\): .+", message), f"not 'what (where): how to fix': {message}"
        where = f"{file}:{expected}" if isinstance(expected, int) else expected
        where = f"{file}{where}" if where.startswith(":") else where
        assert str(file) in message and where in message, f"{where!r} not in {message!r}"
        if fault in ("png", "nul byte"):
            assert "binary" in message
        if fault == "latin-1":
            assert "not UTF-8" in message
        assert files_under(cache) == {}, "a failing corpus left files in the cache"
    assert files_under(tmp_path / "input") == inputs_before, "loading wrote into the user's data"


def assert_tokenized_whole(path: Path, texts: list[str], cache: Path) -> None:
    """prepare_data's cached token stream decodes to exactly the documents, each followed by eos."""
    prepared = data.prepare_data({"path": str(path)}, vocab_size=300, seq_len=32, seed=0, cache_dir=str(cache))
    assert len(prepared.train) + len(prepared.eval) == prepared.num_tokens // 32
    documents = data.load_documents(str(path), cache_dir=str(cache / "datasets"))
    stream = data.tokenize_corpus(documents, prepared.tokenizer, str(cache))  # the cached one: same key
    assert len(stream) == prepared.num_tokens
    eos = prepared.tokenizer.eos_token
    assert prepared.tokenizer.decode(np.asarray(stream).tolist()) == "".join(t + eos for t in texts)
    assert len(list(cache.glob("tokens-*.npy"))) == 1, "tokenize_corpus missed prepare_data's cache"
    assert not list(cache.glob("*.arrow")) and not list(cache.glob("*.tmp*")), "tokenizing left files behind"


def test_enormous_document_is_tokenized_whole(tmp_path):
    """A 5 MB single-line document is neither truncated nor split by the tokenizer or the packing."""
    path = tmp_path / "big.jsonl"
    path.write_bytes(rows([GOOD[0], BIG]))
    assert_tokenized_whole(path, [GOOD[0], BIG], tmp_path / "cache")

