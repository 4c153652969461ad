"""Source weights into the model one tensor at a time, so that no rank holds the whole fp32
model beside its own share of it (issue 22 item 4, issue 23 item 2).

- A Hugging Face folder is read lazily: :class:`SafetensorsFolder` knows every tensor's
  name, shape and dtype from the files' headers and reads a tensor (``safe_open``, the one
  tensor copied out, the file closed) only when it is asked for. The HF-to-lmforge mappings
  (``model.hf.from_hf``) run unchanged on it: the structural operations they use
  (``torch.cat`` of q/k/v, slicing, ``.t()``) return :class:`LazyTensor` s that read their
  parts when loaded; anything else reads the tensor then and there.
- Under ZeRO-3 (from scratch too; LoRA runs excepted) the model is built partitioned
  (``deepspeed.zero.Init``, :func:`model_build_context`); :func:`copy_weights` fills each
  parameter inside
  ``deepspeed.zero.GatheredParameters(modifier_rank=0)``: rank 0 reads the one source
  tensor, the others hold their partition plus the gathered parameter for that moment.
- Under ZeRO 0-2 (every rank holds the whole model anyway) global rank 0 reads each tensor
  and broadcasts it: the source is read once for the job, never once per rank.

Peak per rank while loading: its partition (ZeRO-3; the whole model at ZeRO 0-2) plus one
gathered parameter and, on rank 0, that parameter's source tensor(s) in the file's dtype
and in fp32 (a fused q/k/v reads its three parts).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class WarmStartError(ValueError):
    """``init.source`` cannot start this run (names the key and what to do)."""


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: those its ``model.safetensors.index.json``
    maps (a sharded checkpoint), else ``model.safetensors``, else every ``*.safetensors``.

    Raises:
        WarmStartError: No safetensors file, or the index names a file that is missing.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise WarmStartError(f"init.source: {index} is not a safetensors index (no "
                                 f"weight_map: {err}); restore the file") from err
        names = sorted(set(weight_map.values()))
        files = [folder / name for name in names]
        missing = [f.name for f in files if not f.is_file() or f.parent != folder]
        if missing:
            raise WarmStartError(f"init.source: {index} maps weights to {missing[:3]}, which "
                                 f"{folder} does not hold; download the missing shards")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WarmStartError(f"init.source: {folder} has config.json but no *.safetensors; "
                             "lmforge reads safetensors only (never pickled .bin files)")
    return files


def release_freed_memory() -> None:
    """Hands the heap's free pages back to the kernel (glibc ``malloc_trim``; elsewhere
    nothing). A tensor freed while smaller ones stay live above it is otherwise kept by the
    allocator: measured, it held back ~40% of a ZeRO-3 rank's partition size during a load
    (benchmarks/memory.py ``import_rss_vs_whole``)."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None
TRIM_BYTES = 1 << 22
"""Tensors from this size (4 MiB) up are followed by :func:`release_freed_memory`."""


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def materialize(value: Any) -> Any:
    """``value`` read when it is a :class:`LazyTensor` (lists and tuples element-wise)."""
    if isinstance(value, LazyTensor):
        return value.load()
    if isinstance(value, (list, tuple)):
        return type(value)(materialize(v) for v in value)
    return value


class LazyTensor:
    """A tensor not read yet: its shape and dtype, and how to read it."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, read: Callable[[], Tensor]):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._read = read

    def load(self) -> Tensor:
        """The tensor, read now (nothing is cached: each call reads it again)."""
        return self._read()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def t(self) -> LazyTensor:
        return LazyTensor(tuple(reversed(self.shape)), self.dtype, lambda: self.load().t())

    def __getitem__(self, index: Any) -> LazyTensor:
        shape = _meta(tuple(self.shape), self.dtype)[index].shape
        return LazyTensor(tuple(shape), self.dtype, lambda: self.load()[index])

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.load(), name)  # any other tensor method: read it

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.cat:
            parts = list(args[0])
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            shape = torch.cat([_meta(tuple(p.shape), p.dtype) for p in parts], dim).shape
            return LazyTensor(tuple(shape), parts[0].dtype,
                              lambda: torch.cat([materialize(p) for p in parts], dim))
        return func(*materialize(args), **{k: materialize(v) for k, v in kwargs.items()})

    def __repr__(self) -> str:
        return f"LazyTensor({tuple(self.shape)}, {self.dtype})"


class SafetensorsFolder(Mapping):
    """The tensors of some safetensors files by name, each read only when asked for.

    Opening it reads the headers only; the mapping never holds weights.
    """

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._where: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    part = handle.get_slice(key)
                    self._where[key] = (str(file), tuple(part.get_shape()),
                                        _DTYPES.get(part.get_dtype(), torch.float32))

    def read(self, key: str) -> Tensor:
        """One tensor, read from its file now (in the file's dtype)."""
        from safetensors import safe_open

        file = self._where[key][0]
        with safe_open(file, framework="pt") as handle:
            return handle.get_tensor(key).clone()  # owns its memory once the file is closed

    def __getitem__(self, key: str) -> LazyTensor:
        _, shape, dtype = self._where[key]
        return LazyTensor(shape, dtype, lambda: self.read(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def partitioned(param: Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter (built under ``zero.Init``)."""
    return hasattr(param, "ds_id")


def full_shape(tensor: Tensor) -> tuple[int, ...]:
    """A parameter's shape, also when ZeRO-3 holds only a partition of it."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def uses_partitioned_build(zero_stage: int, trainable_mode: str) -> bool:
    """Whether the model is built under ``deepspeed.zero.Init``: every ZeRO-3 run (from
    scratch, from a source, with a new classification head: ``init_weights`` initialises
    one gathered module at a time, equal to a whole build) except LoRA, whose ``peft``
    injection wraps each target ``nn.Linear`` of the whole module."""
    return zero_stage == 3 and trainable_mode != "lora"


@contextlib.contextmanager
def written_locally(params: list[Tensor]) -> Iterator[None]:
    """Holds each partitioned parameter of ``params`` whole on this rank alone, unfilled,
    while the block writes it; then keeps this rank's partition of what was written (the
    layout DeepSpeed partitions with: the flattened tensor cut into equal slices in rank
    order) and frees the whole copy. No communication, and one whole parameter at a time:
    every rank must write the same values, as ``init_weights`` does from the same seed.
    A parameter whose partition is not in memory (swapped out) goes through
    ``GatheredParameters(modifier_rank=0)`` instead."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    held = [p for p in params if partitioned(p)]
    local = [p for p in held if p.ds_tensor.status == PartitionedParamStatus.AVAILABLE]
    others = [p for p in held if p.ds_tensor.status != PartitionedParamStatus.AVAILABLE]
    placeholders = [p.data for p in local]
    for param in local:
        param.data = torch.empty(param.ds_shape, dtype=param.ds_tensor.dtype,
                                 device=param.ds_tensor.device)
    with deepspeed.zero.GatheredParameters(others, modifier_rank=0):
        yield
    for param, placeholder in zip(local, placeholders, strict=True):
        rank = getattr(param, "ds_zero_partition_rank", None)
        if rank is None:
            rank = dist.get_rank(group=param.ds_process_group)
        size = param.ds_tensor.ds_numel
        start = rank * size
        count = max(0, min(size, param.ds_numel - start))
        with torch.no_grad():
            if count:
                param.ds_tensor.narrow(0, 0, count).copy_(
                    param.data.reshape(-1).narrow(0, start, count))
        param.data = placeholder
    if sum(p.ds_numel * p.element_size() for p in held) >= TRIM_BYTES:
        release_freed_memory()  # the whole copy is gone: its pages go back


@contextlib.contextmanager
def gathered_on_rank0(params: list[Tensor]) -> Iterator[None]:
    """DeepSpeed's public way to write partitioned parameters: each held whole on every
    rank (an all-gather) while the block writes it, rank 0's values kept."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in params if partitioned(p)],
                                           modifier_rank=0):
        yield


@contextlib.contextmanager
def model_build_context(enabled: bool, ds_config: dict,
                        checked: bool | None = None) -> Iterator[None]:
    """Builds inside ``deepspeed.zero.Init`` (each parameter partitioned as its module is
    made, so no rank ever holds the whole model) when ``enabled``; the model's own
    ``init_weights`` then writes each module's parameters one module at a time
    (``model.layers.gathered_init``): every rank draws the values a whole build draws, in
    the same order, and holds one module whole at a time. Otherwise does nothing.

    On a DeepSpeed version lmforge checked (``checked``; by default
    ``lean_deepspeed.is_checked()``) the writes go through :func:`written_locally` (no
    all-gather: it relies on DeepSpeed's partition layout) and ``zero.Init``'s private
    per-module hook returns freed memory; any other version takes the public
    ``GatheredParameters`` and plain ``zero.Init`` (same weights, a higher peak)."""
    if not enabled:
        yield
        return
    import deepspeed

    from lmforge.launch.train.lean_deepspeed import is_checked
    from lmforge.model.layers import gathered_init

    if not (is_checked() if checked is None else checked):
        with deepspeed.zero.Init(config_dict_or_path=ds_config), \
                gathered_init(gathered_on_rank0):
            yield
        release_freed_memory()
        return

    class TrimmingInit(deepspeed.zero.Init):
        """``zero.Init`` that hands a module's freed whole parameters back to the kernel
        once they are partitioned (glibc otherwise keeps them in the heap, between the
        partitions made after them: measured 0.618 → see benchmarks/memory_build.py)."""

        def _post_init_method(self, module: nn.Module) -> None:
            super()._post_init_method(module)
            own = module.parameters(recurse=False)
            if sum(getattr(q, "ds_numel", 0) * q.element_size() for q in own) >= TRIM_BYTES:
                release_freed_memory()

    with TrimmingInit(config_dict_or_path=ds_config), gathered_init(written_locally):
        yield
    release_freed_memory()  # each module was made whole, then partitioned


def _fill(target: Tensor, value: Any) -> None:
    """Copies the source tensor into ``target`` (fp32 conversion on the way); a source with
    fewer rows (an export drops vocabulary padding) fills the first rows only."""
    source = materialize(value)
    if tuple(source.shape) == tuple(target.shape):
        target.copy_(source)
    else:
        target[: source.shape[0]].copy_(source)
    del source


def copy_weights(model: nn.Module, values: Mapping[str, Any] | None,
                 keys: dict[str, str], rank: int) -> None:
    """Copies ``values[keys[name]]`` into each parameter and buffer ``name`` of ``model``
    (collective: every rank calls it with the same ``keys``; only rank 0 needs ``values``).

    A partitioned parameter is filled inside ``GatheredParameters(modifier_rank=0)``; any
    other tensor is filled on rank 0 and broadcast from it.
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    tensors: list[tuple[str, Tensor]] = [*model.named_parameters(),
                                         *model.named_buffers()]
    for name, tensor in tensors:
        key = keys.get(name)
        if key is None:
            continue
        if partitioned(tensor):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        _fill(tensor.data, values[key])
            if tensor.ds_numel * tensor.element_size() >= TRIM_BYTES:
                release_freed_memory()  # the gathered copy (and rank 0's read) are gone
            continue
        if rank == 0:
            with torch.no_grad():
                _fill(tensor.data, values[key])
        if distributed:
            dist.broadcast(tensor.data, 0)


def from_rank0(obj: Any) -> Any:
    """``obj`` as rank 0 has it, on every rank (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
