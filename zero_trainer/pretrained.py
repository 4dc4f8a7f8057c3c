"""Pretrained weights in: a local Hugging Face model directory -> the model a run trains, with bounded memory.

  read_index(dir): every tensor's file, dtype, shape and byte range, from the safetensors headers alone (the JSON
      header at the front of each file; nothing else is read or mapped). Sharded (model.safetensors.index.json)
      or not.
  weight_sources(model, index): each parameter -> its pieces in the checkpoint, in flat (row-major) order: one
      tensor for most, several for a layout transformers converts on load (Mixtral's per-expert w1/w3/w2 -> fused
      gate_up_proj/down_proj), by transformers' own conversion mapping, so a checkpoint transformers loads loads
      here; with the shape the pieces make.
  preflight(dir, model_cfg): the headers against a meta-device model — missing, unexpected and mis-shaped keys,
      dtypes — each one UsageError line naming the key and its file, before anything launches.
  load_pretrained(model, dir): every parameter read from disk with os.pread, in chunks of at most READ_CHUNK_BYTES.
      At ZeRO-3 (a model built under deepspeed.zero.Init) each rank reads only its own flat partition of each
      parameter into its partition tensor (ds_tensor, swapped in and out again when it lives on NVMe): no rank holds
      a tensor it does not own, and rank 0 holds no more than the others. Below ZeRO-3 each whole tensor is read
      straight into the parameter, one at a time.

transformers' from_pretrained under ZeRO-3 instead has rank 0 read every tensor whole and scatter it (DeepSpeed
issue 3722, transformers 24964): its host memory grows with the model, not with the partition.
"""

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

INDEX_FILE = "model.safetensors.index.json"
READ_CHUNK_BYTES = 64 * 2**20  # one pread at a time: what a load holds beyond the parameters it fills
# safetensors dtype names -> (torch dtype name, bytes); parameters load only from floating-point tensors
DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
          "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
          "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors file: where its bytes are, and what they hold."""
    key: str
    file: str
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple
    begin: int  # byte offset of its first element in the file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1] if self.dtype in DTYPES else 0


@dataclass(frozen=True)
class Source:
    """Where a parameter's elements are, in its flat order: (tensor, first element, count) pieces."""
    pieces: tuple
    shape: tuple

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(t.key for t, _, _ in self.pieces))

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(t.file for t, _, _ in self.pieces))


# ---------------------------------------------------------------------------------------------------------------
# the checkpoint on disk


def weight_files(model_dir) -> list[Path]:
    """The safetensors files of a model directory, or a UsageError saying what is there instead."""
    root = Path(model_dir)
    if not root.is_dir():
        raise UsageError(f"model.pretrained {root} is not a directory", "model.pretrained",
                         "point it at a local Hugging Face model directory (config.json + *.safetensors)")
    if not (root / "config.json").is_file():
        raise UsageError(f"model.pretrained {root} has no config.json", "model.pretrained",
                         "point it at a directory written by save_pretrained (config.json + *.safetensors)")
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{index} is not a safetensors index (no weight_map of key -> file)", "model.pretrained",
                             "rewrite the checkpoint with save_pretrained") from None
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise UsageError(f"{index} names {missing[0]}, which is not in {root}"
                             + (f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else ""),
                             "model.pretrained", "copy every shard the index lists into the directory")
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    if pickled:
        raise UsageError(f"model.pretrained {root} holds only pickled weights ({pickled[0]}); zero_trainer reads "
                         "safetensors (no pickle is ever unpickled)", "model.pretrained",
                         "convert once: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) writes "
                         "*.safetensors")
    raise UsageError(f"model.pretrained {root} has no weights (*.safetensors)", "model.pretrained",
                     "point it at a directory written by save_pretrained")


def read_header(path: Path) -> dict[str, Tensor]:
    """The tensors of one safetensors file, from its header: u64 little-endian length, then that much JSON."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= length <= size - 8:
            raise UsageError(f"{path} is not a safetensors file (header length {length})", "model.pretrained",
                             "rewrite the checkpoint with save_pretrained(safe_serialization=True)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise UsageError(f"{path} is not a safetensors file (its header is not JSON)", "model.pretrained",
                             "rewrite the checkpoint with save_pretrained(safe_serialization=True)") from None
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        t = Tensor(key, str(path), info["dtype"], tuple(info["shape"]), 8 + length + begin)
        if t.dtype in DTYPES and (end - begin != t.numel * t.itemsize or 8 + length + end > size):
            raise UsageError(f"{path}: tensor {key} claims {end - begin} bytes at {begin}, which does not match "
                             f"its shape {list(t.shape)} {t.dtype} or the file ({size} bytes)", "model.pretrained",
                             "the file is truncated or corrupt: copy it again")
        tensors[key] = t
    return tensors


def read_index(model_dir) -> dict[str, Tensor]:
    """Every tensor of the checkpoint by key, from the headers of its safetensors files."""
    index: dict[str, Tensor] = {}
    for path in weight_files(model_dir):
        for key, tensor in read_header(path).items():
            if key in index:
                raise UsageError(f"tensor {key} is in both {Path(index[key].file).name} and {path.name}",
                                 "model.pretrained", "keep one copy of each tensor in the checkpoint")
            index[key] = tensor
    return index


def fingerprint(index: dict[str, Tensor]) -> str:
    """Identifies a checkpoint's layout and files (names, dtypes, shapes, byte ranges, file sizes), so a resume can
    tell whether its run started from these weights; cheap, reads no tensor data."""
    import hashlib

    digest = hashlib.sha256()
    sizes = {f: os.path.getsize(f) for f in {t.file for t in index.values()}}
    for key in sorted(index):
        t = index[key]
        digest.update(f"{key}|{Path(t.file).name}|{t.dtype}|{t.shape}|{t.begin}|{sizes[t.file]}\n".encode())
    return digest.hexdigest()[:16]


def source_dtype(index: dict[str, Tensor]) -> str:
    """The torch dtype name most of the checkpoint's floating-point elements have (what an export writes back)."""
    counts: dict[str, int] = {}
    for t in index.values():
        if t.dtype in FLOAT_DTYPES:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
    return DTYPES[max(counts, key=counts.get)][0] if counts else "float32"


def has_tokenizer(model_dir) -> bool:
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)


# ---------------------------------------------------------------------------------------------------------------
# checkpoint keys -> model parameters


def _natural(key: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def _conversions(model):
    """transformers' renamings and converters for this model class (conversion_mapping.py): the layouts its
    from_pretrained accepts. None of them for a class transformers does not know (ours)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _merged_source(target: str, converter, by_pattern: dict[int, list[Tensor]]) -> Source:
    """The flat pieces of a target a WeightConverter builds by MergeModulelist(dim=0) (stack the keys that differ by a
    number) and then Concatenate(dim=d) over its source patterns: the only ops read here; anything else is refused."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    merge = bool(ops) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
    rest = ops[1:] if merge else ops
    if len(rest) > 1 or (rest and not isinstance(rest[0], Concatenate)):
        names = ", ".join(type(op).__name__ for op in ops)
        first = next(iter(by_pattern.values()))[0]
        raise UsageError(f"{first.key} in {Path(first.file).name} is stored in a layout transformers converts with "
                         f"{names}, which zero_trainer does not read partition by partition", "model.pretrained",
                         "load and re-save it in transformers' current layout (from_pretrained, then "
                         "save_pretrained) or in zero_trainer's (zero-trainer export)")
    concat_dim = rest[0].dim if rest else 0
    parts = []  # per source pattern: (list of tensors stacked, the stacked shape)
    for p in range(len(converter.source_patterns)):
        tensors = sorted(by_pattern.get(p, []), key=lambda t: _natural(t.key))
        if not tensors:
            raise UsageError(f"{target} is built from keys matching '{converter.source_patterns[p]}', and the "
                             "checkpoint has none", "model.pretrained", "the checkpoint is incomplete: copy it again")
        shapes = {t.shape for t in tensors}
        if len(shapes) > 1 or (not merge and len(tensors) > 1):
            raise UsageError(f"{tensors[0].key} and {tensors[-1].key} (in {Path(tensors[-1].file).name}) cannot be "
                             f"stacked into {target}: shapes {sorted(shapes)}", "model.pretrained",
                             "the checkpoint does not match its config")
        shape = (len(tensors), *tensors[0].shape) if merge else tensors[0].shape
        parts.append((tensors, shape))
    lead = parts[0][1][:concat_dim]
    if any(s[:concat_dim] != lead or s[concat_dim + 1:] != parts[0][1][concat_dim + 1:] for _, s in parts):
        raise UsageError(f"the tensors that make {target} do not concatenate: "
                         + ", ".join(str(list(s)) for _, s in parts), "model.pretrained",
                         "the checkpoint does not match its config")
    shape = list(parts[0][1])
    shape[concat_dim] = sum(s[concat_dim] for _, s in parts)
    outer = 1
    for d in lead:
        outer *= d
    pieces = []
    for j in range(outer):  # concatenation along dim d: for every index of the leading dims, each part's block in turn
        for tensors, s in parts:
            block = 1
            for d in s[concat_dim:]:
                block *= d
            pieces += _span(tensors, j * block, block)
    return Source(tuple(pieces), tuple(shape))


def _span(tensors: list[Tensor], start: int, count: int) -> list[tuple]:
    """Elements [start, start + count) of the flat concatenation of `tensors`, as pieces."""
    pieces = []
    for t in tensors:
        if count <= 0:
            break
        if start >= t.numel:
            start -= t.numel
            continue
        n = min(count, t.numel - start)
        pieces.append((t, start, n))
        count, start = count - n, 0
    return pieces


def weight_sources(model, index: dict[str, Tensor]) -> tuple[dict[str, Source], list[Tensor]]:
    """(model key -> Source, checkpoint tensors no parameter or buffer takes). Keys are the model's state-dict names
    (a tied head and its embedding both map to whatever the checkpoint holds of them)."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _conversions(model)
    names = {name: True for name in model.state_dict()}
    prefix = getattr(model, "base_model_prefix", None)
    plain: dict[str, Source] = {}
    grouped: dict[str, tuple] = {}  # converted target -> (converter, {pattern index: [tensors]})
    unexpected = []
    for key in sorted(index, key=_natural):
        t = index[key]
        target, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if pattern is not None:
            converter = next(c for c in converters if pattern in c.source_patterns)
            entry = grouped.setdefault(target, (converter, {}))
            entry[1].setdefault(converter.source_patterns.index(pattern), []).append(t)
        elif target in names:
            plain[target] = Source(((t, 0, t.numel),), t.shape)
        else:
            unexpected.append(t)
    for target, (converter, by_pattern) in grouped.items():
        if target in names:
            plain[target] = _merged_source(target, converter, by_pattern)
        else:
            unexpected += [t for ts in by_pattern.values() for t in ts]
    return plain, unexpected


def _ignored_unexpected(model, key: str) -> bool:
    """Keys transformers' from_pretrained drops without a word: the class's _keys_to_ignore_on_load_unexpected, and
    non-persistent buffers older checkpoints saved (rotary inv_freq)."""
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    if any(re.search(p, key) for p in patterns):
        return True
    persistent = set(model.state_dict())
    return any(key.endswith(name) and name not in persistent for name, _ in model.named_buffers())


def parameter_groups(model) -> list[list[str]]:
    """The names of each unique parameter (a tied head and its embedding together), in model order."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return list(groups.values())


def check_against(model, index: dict[str, Tensor], model_dir) -> dict[str, Source]:
    """Every parameter of `model` (meta, or built under zero.Init) has exactly one source of its shape and a
    floating-point dtype, and every checkpoint tensor is used; returns parameter name -> Source. One UsageError line
    for the first problem, naming the key and its file."""
    sources, unexpected = weight_sources(model, index)
    where = "model.pretrained"
    unexpected = [t for t in unexpected if not _ignored_unexpected(model, t.key)]
    if unexpected:
        t = unexpected[0]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UsageError(f"checkpoint tensor {t.key} in {Path(t.file).name} matches no parameter of "
                         f"{type(model).__name__}{more}", where,
                         "the weights are for another architecture or size than config.json says: use the "
                         "config.json saved with them")
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters(
        remove_duplicate=False)}
    chosen = {}
    for names in parameter_groups(model):
        found = [n for n in names if n in sources]
        if not found:
            raise UsageError(f"{names[0]} ({list(shapes[names[0]])}) is missing from {Path(model_dir)} ("
                             f"{len(names) > 1 and 'tied to ' + ', '.join(names[1:]) + '; ' or ''}no checkpoint "
                             "tensor maps to it)", where,
                             "the weights are for another architecture than config.json says, or a shard is missing")
        name = found[0]
        src = sources[name]
        if tuple(src.shape) != shapes[name]:
            raise UsageError(f"{src.keys[0]} in {Path(src.files[0]).name} has shape {list(src.shape)}; the model built "
                             f"from config.json has {name} of shape {list(shapes[name])}", where,
                             "use the config.json saved with these weights")
        bad = next((t for t, _, _ in src.pieces if t.dtype not in FLOAT_DTYPES), None)
        if bad is not None:
            raise UsageError(f"{bad.key} in {Path(bad.file).name} is {bad.dtype}; parameters load only from "
                             f"{'/'.join(FLOAT_DTYPES)} tensors (quantized checkpoints are not trained here)", where,
                             "use the unquantized checkpoint")
        chosen[name] = src
    for name, buffer in model.named_buffers():  # persistent buffers the checkpoint holds load too
        if name in sources and tuple(sources[name].shape) == tuple(buffer.shape):
            chosen[name] = sources[name]
    return chosen


def preflight(model_dir, model_cfg) -> dict[str, Tensor]:
    """The checkpoint's headers against a meta-device build of its config: raises the first problem as one line;
    returns the index."""
    import torch

    from .model import build_model

    index = read_index(model_dir)
    with torch.device("meta"):
        model = build_model(model_cfg)
    check_against(model, index, model_dir)
    return index


# ---------------------------------------------------------------------------------------------------------------
# reading


class Reader:
    """pread-based reads of flat element ranges into tensors, through one reused buffer of READ_CHUNK_BYTES."""

    def __init__(self, chunk_bytes: int = READ_CHUNK_BYTES):
        self.files: dict[str, int] = {}
        self.buffer = bytearray(chunk_bytes)
        self.bytes_read = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()

    def _fd(self, path: str) -> int:
        if path not in self.files:
            self.files[path] = os.open(path, os.O_RDONLY)
        return self.files[path]

    def read(self, source: Source, start: int, out) -> None:
        """Elements [start, start + out.numel()) of the source's flat order into the 1-D tensor `out` (any dtype or
        device: each chunk is cast on the copy)."""
        import torch

        want, done = out.numel(), 0
        for tensor, first, count in source.pieces:
            if want <= 0:
                break
            if start >= count:
                start -= count
                continue
            n = min(count - start, want)
            itemsize = tensor.itemsize
            per_chunk = max(1, len(self.buffer) // itemsize)
            element = first + start
            left = n
            while left:
                k = min(left, per_chunk)
                view = memoryview(self.buffer)[: k * itemsize]
                got = os.preadv(self._fd(tensor.file), [view], tensor.begin + element * itemsize)
                if got != k * itemsize:
                    raise OSError(f"{tensor.file}: short read of {tensor.key} ({got} of {k * itemsize} bytes)")
                chunk = torch.frombuffer(view, dtype=getattr(torch, DTYPES[tensor.dtype][0]), count=k)
                out[done: done + k].copy_(chunk)
                self.bytes_read += k * itemsize
                done, left, element = done + k, left - k, element + k
            want -= n
            start = 0


def _zero3_partition(param):
    """(first element, count) of this rank's flat partition of a ZeRO-3 parameter; count falls short of the partition
    where it is padding. DeepSpeed's _partition_param: rank r of the parameter's group holds elements [r·p, (r+1)·p)
    of the padded flat tensor, p = ceil(numel / ranks)."""
    import deepspeed.comm as dist

    size = param.ds_tensor.ds_numel
    start = dist.get_rank(group=param.ds_process_group) * size
    return start, max(0, min(size, param.ds_numel - start))


def load_pretrained(model, model_dir, index: dict[str, Tensor] | None = None) -> dict:
    """Fill every parameter (and persistent buffer the checkpoint holds) of `model` from `model_dir`; returns
    {"bytes_read", "tensors"}. A model built under deepspeed.zero.Init is filled partition by partition."""
    import torch

    index = index if index is not None else read_index(model_dir)
    sources = check_against(model, index, model_dir)
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    with Reader() as reader, torch.no_grad():
        for name, src in sources.items():
            tensor = tensors[name]
            if hasattr(tensor, "ds_tensor"):
                _load_partition(tensor, src, reader)
            else:
                reader.read(src, 0, tensor.data.view(-1))
        return {"bytes_read": reader.bytes_read, "tensors": len(sources)}


def _load_partition(param, src: Source, reader: Reader) -> None:
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    start, count = _zero3_partition(param)
    on_nvme = param.ds_tensor.final_location == OffloadDeviceEnum.nvme
    if on_nvme and param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE:
        param.nvme_swapper.swap_in([param], async_op=False)
    if count:
        reader.read(src, start, param.ds_tensor.data.view(-1)[:count])
    if on_nvme:
        param.nvme_swapper.swap_out_and_release([param])
