"""Reading, checking and writing DINOv weights.

The released checkpoints are detectron2 files: ``{"model": state_dict}`` with every key prefixed ``model.``;
some tensors are stored under several names because the official modules are shared (``decoder_norm`` is also
``decoder.norm``; one box head is ``_bbox_embed``, ``bbox_embed.N`` and ``decoder.bbox_embed.N``).
:func:`read_state_dict` turns such a file (or a ``.safetensors`` file written by :func:`save_safetensors`) into a
plain state dict, and :func:`load_into` loads it strictly, accepting any one name of a shared tensor.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

# Prefix of every key in the files written by detectron2's checkpointer around DINOv's BaseModel.
MODEL_PREFIX = "model."
# Keys of training-only modules (the loss holds e.g. ``criterion.empty_weight``); inference never needs them.
TRAINING_ONLY_PREFIXES = ("criterion.",)
SAFETENSORS_SUFFIX = ".safetensors"
# How many keys of each kind an error message lists before summarising the rest.
MAX_LISTED_KEYS = 15

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the model it is loaded into."""


def read_state_dict(path: PathLike) -> dict[str, Tensor]:
    """Read a ``.pth``/``.pt`` or ``.safetensors`` checkpoint into a CPU state dict with model-relative keys.

    Accepts ``{"model": state_dict}`` or a bare state dict, strips a leading ``model.`` from keys and drops
    training-only entries (``criterion.*``). Raises :class:`CheckpointError` for a missing, truncated or corrupt
    file, or one that holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file); download it or fix the path")
    raw: object
    if path.suffix == SAFETENSORS_SUFFIX:
        raw = _read_safetensors(path)
    else:
        raw = _read_torch(path)

    if isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping):
        raw = raw["model"]
    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointError(
            f"{path} holds a {type(raw).__name__}, not a state dict (a mapping of names to tensors, possibly under "
            f"'model'); is it a DINOv checkpoint?"
        )
    not_tensors = [str(k) for k, v in raw.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if not_tensors:
        raise CheckpointError(
            f"{path} is not a plain state dict: entries {_listing(not_tensors)} are not tensors under string names; "
            f"is it a DINOv checkpoint?"
        )

    state_dict: dict[str, Tensor] = {}
    for key, value in raw.items():
        if key.startswith(MODEL_PREFIX):
            key = key[len(MODEL_PREFIX) :]
        if key.startswith(TRAINING_ONLY_PREFIXES):
            continue
        state_dict[key] = value
    return state_dict


def _read_torch(path: Path) -> object:
    try:
        # weights_only: never run code from a downloaded pickle.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"cannot read {path} as a weights-only PyTorch checkpoint ({err}). Either it is corrupt or truncated "
            f"(delete it and download it again) or it holds Python objects besides tensors and is not a plain "
            f"DINOv checkpoint"
        ) from err
    except Exception as err:  # a damaged file makes the unpickler fail in many ways (IndexError, EOFError, ...)
        raise CheckpointError(
            f"cannot read checkpoint {path}: {str(err).rstrip('.')}. The file is truncated or corrupt (e.g. an "
            f"interrupted download) or not a PyTorch file; delete it and download it again"
        ) from err


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"cannot read safetensors file {path}: {str(err).rstrip('.')}. The file is truncated or corrupt; "
            f"delete it and write or download it again"
        ) from err


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata stored in a ``.safetensors`` header (empty if there is none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read the safetensors header of {path}: {err}") from err


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Copy ``state_dict`` into ``model`` after checking that it fits exactly.

    Names that hold one tensor form a group; a group is satisfied when the state dict gives the tensor under any
    of its names, and then every model name in the group is filled. Names are grouped when
      * the model ties them (one Parameter/buffer reached through several module paths),
      * the state dict stores them as the same tensor (``torch.save`` keeps shared storage), or
      * ``aliases`` lists them (``{name: [other names of the same tensor]}``, e.g. the manifests' ``aliases``
        without the ``model.`` prefix).
    Entries for the model's non-persistent buffers are ignored. Otherwise any missing, unexpected or mis-shaped
    key raises :class:`CheckpointError`, whose message names ``source`` and lists the keys.
    """
    targets = model.state_dict(keep_vars=True)
    ignored = _non_persistent_buffer_names(model)

    groups = _UnionFind()
    first_name: dict[int, str] = {}
    for name, tensor in targets.items():
        groups.add(name)
        groups.union(name, first_name.setdefault(id(tensor), name))
    for names in _same_storage_groups(state_dict).values():
        for name in names:
            groups.union(names[0], name)
    for name, others in (aliases or {}).items():
        for other in others:
            groups.union(name, other)

    missing: list[str] = []
    mis_shaped: list[str] = []
    inconsistent: list[str] = []
    source_of: dict[str, str] = {}
    for members in groups.classes():
        model_names = [n for n in members if n in targets]
        if not model_names:
            continue
        given = [n for n in members if n in state_dict]
        if not given:
            missing.append(" = ".join(model_names))
            continue
        # Prefer a name the model itself uses, so that messages refer to the model's layout.
        given.sort(key=lambda n: n not in targets)
        src = state_dict[given[0]]
        for other in given[1:]:
            if state_dict[other].shape != src.shape or not torch.equal(state_dict[other], src):
                inconsistent.append(f"{given[0]} != {other}")
        for name in model_names:
            if tuple(targets[name].shape) != tuple(src.shape):
                found_as = "" if given[0] == name else f" (as {given[0]})"
                mis_shaped.append(f"{name}: expected {tuple(targets[name].shape)}, found {tuple(src.shape)}{found_as}")
            source_of[name] = given[0]

    roots_with_model_names = {groups.find(name) for name in targets}
    unexpected = [
        name for name in state_dict if name not in ignored and groups.find(name) not in roots_with_model_names
    ]

    if missing or unexpected or mis_shaped or inconsistent:
        raise CheckpointError(_mismatch_message(source, missing, unexpected, mis_shaped, inconsistent))

    with torch.no_grad():
        for name, src_name in source_of.items():
            targets[name].copy_(state_dict[src_name])


def save_safetensors(model: nn.Module, path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write the model's state dict as ``.safetensors``, each shared tensor once (under its first name).

    :func:`load_into` restores the ties, since the model ties the other names to the one that was kept. The file
    is written to a temporary name and renamed, so an interrupted save never leaves a partial checkpoint.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str; convert values with str() or json.dumps()")

    unique: dict[str, Tensor] = {}
    storages_seen: set = set()
    state = model.state_dict()
    for names in _same_storage_groups(state).values():
        tensor = state[names[0]].detach().cpu()
        storage = _storage_key(tensor)
        # safetensors refuses tensors that overlap in memory; copy a view that shares storage with another.
        if storage in storages_seen or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages_seen.add(storage)
        unique[names[0]] = tensor

    tmp = path.with_name(path.name + ".tmp")
    save_file(unique, tmp, metadata=dict(metadata) if metadata else None)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------


def _storage_key(tensor: Tensor) -> tuple[int, str]:
    return tensor.untyped_storage().data_ptr(), str(tensor.device)


def _same_storage_groups(state_dict: Mapping[str, Tensor]) -> dict[object, list[str]]:
    """Names grouped by identical tensor (same memory, offset, shape, strides and dtype), in state-dict order."""
    groups: dict[object, list[str]] = {}
    for name, tensor in state_dict.items():
        if tensor.numel() == 0:  # empty tensors may all report address 0
            key: object = ("empty", name)
        else:
            key = (
                _storage_key(tensor),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tensor.stride(),
                tensor.dtype,
            )
        groups.setdefault(key, []).append(name)
    return groups


def _non_persistent_buffer_names(model: nn.Module) -> set:
    names = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for buffer_name in module._non_persistent_buffers_set:
            names.add(f"{prefix}.{buffer_name}" if prefix else buffer_name)
    return names


class _UnionFind:
    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def add(self, name: str) -> None:
        self._parent.setdefault(name, name)

    def find(self, name: str) -> str:
        self.add(name)
        while self._parent[name] != name:
            self._parent[name] = self._parent[self._parent[name]]
            name = self._parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[rb] = ra

    def classes(self) -> list[list[str]]:
        out: dict[str, list[str]] = {}
        for name in self._parent:
            out.setdefault(self.find(name), []).append(name)
        return list(out.values())


def _listing(items: Iterable[str], indent: str = "") -> str:
    items = list(items)
    shown = [f"{indent}{item}" for item in items[:MAX_LISTED_KEYS]]
    if len(items) > MAX_LISTED_KEYS:
        shown.append(f"{indent}... and {len(items) - MAX_LISTED_KEYS} more")
    return ("\n" if indent else ", ").join(shown)


def _mismatch_message(
    source: str, missing: list[str], unexpected: list[str], mis_shaped: list[str], inconsistent: list[str]
) -> str:
    lines = [f"checkpoint {source} does not fit the model:"]
    for title, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("keys with the wrong shape", mis_shaped),
        ("names of one shared tensor holding different values", inconsistent),
    ):
        if keys:
            lines.append(f"  {len(keys)} {title}:")
            lines.append(_listing(keys, indent="    "))
    hint = "Is this a checkpoint of another architecture or preset (e.g. Swin-T weights for a Swin-L model)?"
    if unexpected and all(k.startswith(MODEL_PREFIX) for k in unexpected):
        hint = f"The keys still carry the '{MODEL_PREFIX}' prefix: read the file with read_state_dict()."
    lines.append(hint)
    return "\n".join(lines)


def write_metadata(path: PathLike, updates: Mapping[str, str]) -> None:
    """Add or replace string metadata of a ``.safetensors`` checkpoint, keeping its tensors as they are."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise CheckpointError(f"{path}: only .safetensors files carry metadata; save it with save_model first")
    metadata = read_safetensors_metadata(path)
    metadata.update({str(k): str(v) for k, v in updates.items()})
    tensors = _read_safetensors(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


DIGEST_CACHE_MIN_BYTES = 64 * 1024 * 1024  # smaller files hash in well under a second


def file_digest(path: Path) -> str:
    """Short content hash of a checkpoint file. A large one's is cached beside it (hashing Swin-L takes seconds;
    it lives in a folder the user chose, such as MODEL_DIR); a small one (the shipped demo, a project's delta) is
    hashed each time, so that nothing is written into an installed package."""
    stat = path.stat()
    stamp = path.with_name(path.name + ".sha256")
    cached_beside = stat.st_size >= DIGEST_CACHE_MIN_BYTES
    if cached_beside and stamp.exists():
        cached = stamp.read_text().split()
        if len(cached) == 3 and cached[1:] == [str(stat.st_size), str(int(stat.st_mtime))]:
            return cached[0]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    short = digest.hexdigest()[:12]
    if cached_beside:
        try:
            stamp.write_text(f"{short} {stat.st_size} {int(stat.st_mtime)}")
        except OSError:
            pass  # a read-only model folder only costs the hash next time
    return short
