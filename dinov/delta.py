"""Delta checkpoints: only the parameters a fine-tuning changed, against a named base checkpoint.

    save_delta(model, names, "p3.safetensors", base_digest=digest, metadata={...})
    metadata = apply_delta(model, "p3.safetensors", base_digest=digest)   # model: the base, loaded

A hundred fine-tuned projects then cost a hundred decoders, not a hundred models. The file records the content
digest of its base (``dinov.build.load_model``'s digest); applying it to another base raises
:class:`BaseMismatch`, since trained decoder weights mean nothing on top of a different backbone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from dinov.checkpoint import SAFETENSORS_SUFFIX, CheckpointError, read_safetensors_metadata

BASE_DIGEST_KEY = "dinov_delta_base"  # metadata: the digest of the base checkpoint


class BaseMismatch(CheckpointError):
    """A delta checkpoint was trained on top of another base checkpoint than the one given."""


def trainable_names(model: nn.Module) -> list[str]:
    """The names of the parameters that require a gradient (each shared parameter once)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def save_delta(model: nn.Module, names: Sequence[str], path: str | os.PathLike, base_digest: str,
               metadata: Mapping[str, str] | None = None) -> None:
    """Write the parameters `names` of `model` as safetensors with the base's digest, atomically (a temporary file
    renamed), so that a reader never sees half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise CheckpointError(f"{path}: a delta checkpoint is a {SAFETENSORS_SUFFIX} file")
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise CheckpointError(f"the model has no parameters {unknown[:5]}")
    tensors = {n: params[n].detach().cpu().clone(memory_format=torch.contiguous_format) for n in names}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[BASE_DIGEST_KEY] = base_digest
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def read_delta(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a delta checkpoint; CheckpointError for a file that is not one."""
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_safetensors_metadata(path)
    if BASE_DIGEST_KEY not in metadata:
        raise CheckpointError(f"{path} is not a delta checkpoint (no {BASE_DIGEST_KEY} in its metadata)")
    try:
        return load_file(path, device="cpu"), metadata
    except Exception as err:  # safetensors raises several kinds for a damaged file
        raise CheckpointError(f"cannot read delta checkpoint {path}: {err}") from err


def apply_delta(model: nn.Module, path: str | os.PathLike, base_digest: str) -> dict[str, str]:
    """Load the delta at `path` into `model` (the base checkpoint, loaded) and return the delta's metadata.
    Raises BaseMismatch when the delta was trained on another base, CheckpointError when it does not fit."""
    tensors, metadata = read_delta(path)
    if metadata[BASE_DIGEST_KEY] != base_digest:
        raise BaseMismatch(f"{path} was trained on base checkpoint {metadata[BASE_DIGEST_KEY]}, not on the "
                           f"current base {base_digest}; train the project again")
    params = dict(model.named_parameters())
    wrong = [n for n, t in tensors.items() if n not in params or tuple(params[n].shape) != tuple(t.shape)]
    if wrong:
        raise CheckpointError(f"{path} does not fit the model: {wrong[:5]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return metadata
