"""Building DINOv models from checkpoints: the names a user may give (the shipped demo, the released Swin-T and
Swin-L, a file), the config each needs, and the metadata that travels with a model (its default score threshold,
its score form, its readable name). Reading and writing the tensors themselves is dinov.checkpoint's job.

    model, config, digest = load_model("demo")          # or "swinT", "swinL", a .pth/.safetensors path
    save_model(model, config, "mine.safetensors")       # load_model("mine.safetensors") needs nothing else
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from dinov.checkpoint import (
    SAFETENSORS_SUFFIX,
    CheckpointError,
    PathLike,
    file_digest,
    load_into,
    read_safetensors_metadata,
    read_state_dict,
    save_safetensors,
)
from dinov.config import PRESETS, DINOvConfig
from dinov.modeling.dinov import DINOv, build_dinov

# Names a user may give instead of a path: the released files, and the demo model shipped here.
RELEASED_CHECKPOINTS = {"swinT": ("model_swinT.pth", "swin_t"), "swinL": ("model_swinL.pth", "swin_l")}
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "demo.safetensors"
CONFIG_METADATA_KEY = "dinov_config"
# The checkpoint's default score threshold for generic segmentation (`python -m dinov.eval.calibrate` writes it);
# files without it (the released checkpoints, older files) use the official demo's 0.12.
SCORE_THRESHOLD_METADATA_KEY = "default_score_threshold"
# What a generic region's score is (dinov.postprocess.SCORE_FORMS); absent: the official class probability.
SCORE_FORM_METADATA_KEY = "score_form"
OFFICIAL_SCORE_THRESHOLD = 0.12


def load_model(checkpoint: PathLike, config: DINOvConfig | None = None,
               cache_dir: PathLike | None = None) -> tuple[DINOv, DINOvConfig, str]:
    """Build and load a DINOv model from `demo`, `swinT`, `swinL` or a checkpoint file.

    The config comes from, in order: the `config` argument, the safetensors metadata written by
    `save_model`, the released preset of a named checkpoint, or the preset whose shapes fit.
    Returns (model in eval mode, its config, short content hash of the file for cache keys). The model carries
    ``default_score_threshold`` (from the file's metadata, else the official 0.12) and ``model_name``
    (:func:`model_name`).
    """
    from dinov.download import download_checkpoint  # only for the released names

    name = str(checkpoint)
    preset = None
    if name == "demo":
        path = DEMO_CHECKPOINT
        if not path.exists():
            raise CheckpointError(f"the demo checkpoint {path} is missing from this installation; reinstall the "
                                  "project or train it again with the command in BENCHMARKS.md")
    elif name in RELEASED_CHECKPOINTS:
        filename, preset = RELEASED_CHECKPOINTS[name]
        if cache_dir is None:
            raise CheckpointError(f"checkpoint {name!r} is downloaded on first use: give a cache directory (MODEL_DIR)")
        path = download_checkpoint(filename, Path(cache_dir))
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"checkpoint {path} does not exist; give 'demo', 'swinT', 'swinL' or the path of a .pth/.safetensors file"
            )

    state_dict = read_state_dict(path)
    metadata = read_safetensors_metadata(path) if path.suffix == SAFETENSORS_SUFFIX else {}
    if config is None and metadata.get(CONFIG_METADATA_KEY):
        config = DINOvConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    if config is None and preset is not None:
        config = PRESETS[preset]()
    if config is None:
        config = _infer_preset(state_dict, path)
    model = build_dinov(config)
    load_into(model, state_dict, source=str(path))
    digest = file_digest(path)
    model.default_score_threshold = float(metadata.get(SCORE_THRESHOLD_METADATA_KEY, OFFICIAL_SCORE_THRESHOLD))
    model.score_form = metadata.get(SCORE_FORM_METADATA_KEY, "class_probability")
    model.model_name = model_name(checkpoint, digest)
    return model.eval(), config, digest


def model_name(checkpoint: PathLike, digest: str) -> str:
    """A readable name of a checkpoint for predictions' model_version: "demo-1a2b3c4d", "swinT-…", or the file's
    stem for a path ("mymodel-…"); the suffix is the first 8 hex digits of the file's content hash, so a
    retrained file gets a new name."""
    name = str(checkpoint)
    if name != "demo" and name not in RELEASED_CHECKPOINTS:
        name = Path(name).name
        for suffix in (SAFETENSORS_SUFFIX, ".pth", ".pt"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
    return f"{name}-{digest[:8]}"


def save_model(model: nn.Module, config: DINOvConfig, path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Save a model as safetensors with its config, so that `load_model(path)` needs nothing else."""
    meta = {CONFIG_METADATA_KEY: json.dumps(config.to_dict())}
    meta.update(metadata or {})
    save_safetensors(model, path, metadata=meta)


def _infer_preset(state_dict: Mapping[str, Tensor], path: Path) -> DINOvConfig:
    """The preset whose state_dict shapes all match the file's, for files without a stored config."""
    for make in PRESETS.values():
        with torch.device("meta"):
            expected = build_dinov(make()).state_dict()
        if all(key in state_dict and tuple(state_dict[key].shape) == tuple(value.shape)
               for key, value in expected.items()):
            return make()
    raise CheckpointError(
        f"{path}: its tensors fit none of the presets {sorted(PRESETS)}; pass the model's config explicitly "
        "(DINOvConfig) or save it with dinov.build.save_model, which stores the config in the file"
    )
