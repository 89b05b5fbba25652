import argparse
import re

import pytest
import torch
from safetensors import safe_open
from torch import nn

from dinov.checkpoint import CheckpointError, load_into, read_safetensors_metadata, read_state_dict, save_safetensors


class BoxMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width), nn.Linear(width, 4)])

    def forward(self, x):
        return self.layers[1](torch.relu(self.layers[0](x)))


class TiedModel(nn.Module):
    """Mimics DINOv's sharing: decoder_norm is decoder.norm, one box head under three paths."""

    def __init__(self, width: int = 8, tie: bool = True) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, width), nn.LayerNorm(width))
        self.decoder_norm = nn.LayerNorm(width)
        self.decoder = nn.Module()
        box = BoxMLP(width)
        self._bbox_embed = box
        if tie:
            self.decoder.norm = self.decoder_norm
            self.bbox_embed = nn.ModuleList([box, box])
            self.decoder.bbox_embed = self.bbox_embed
        self.register_buffer("index", torch.arange(width))
        self.register_buffer("pixel_mean", torch.tensor([1.0, 2.0, 3.0]), persistent=False)

    def forward(self, x):
        h = self.decoder_norm(self.backbone(x - self.pixel_mean)) + self.index.float()
        return self._bbox_embed(h)


def randomised(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def official_format(model: nn.Module) -> dict:
    """As detectron2 saves DINOv: prefixed keys, training extras, under "model"."""
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    sd["model.criterion.empty_weight"] = torch.ones(3)
    return {"model": sd}


X = torch.randn(5, 3, generator=torch.Generator().manual_seed(123))


def test_safetensors_round_trip_gives_identical_outputs(tmp_path):
    src = randomised(TiedModel(), 0)
    path = tmp_path / "w.safetensors"
    save_safetensors(src, path, metadata={"preset": "tiny", "source": "unit test"})

    with safe_open(path, framework="pt") as f:
        stored = set(f.keys())
    # one entry per shared tensor: 4 backbone + 2 norm + 4 box + 1 buffer tensors
    assert len(stored) == 11 < len(src.state_dict())
    assert {k for k in stored if "norm" in k and "backbone" not in k} in (
        {"decoder_norm.weight", "decoder_norm.bias"},
        {"decoder.norm.weight", "decoder.norm.bias"},
    )
    assert read_safetensors_metadata(path) == {"preset": "tiny", "source": "unit test"}

    dst = randomised(TiedModel(), 1)
    assert not torch.equal(dst(X), src(X))
    load_into(dst, read_state_dict(path), str(path))
    assert torch.equal(dst(X), src(X))
    for name, tensor in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], tensor), name
    # ties survive the load
    assert dst.decoder.norm.weight is dst.decoder_norm.weight
    assert dst.decoder.bbox_embed[1].layers[0].weight is dst._bbox_embed.layers[0].weight


def test_official_pth_format_is_read_and_loaded(tmp_path):
    src = randomised(TiedModel(), 0)
    path = tmp_path / "model.pth"
    torch.save(official_format(src), path)

    sd = read_state_dict(path)
    assert not any(k.startswith("model.") or k.startswith("criterion.") for k in sd)
    assert set(sd) == set(src.state_dict())

    dst = randomised(TiedModel(), 1)
    load_into(dst, sd, str(path))
    assert torch.equal(dst(X), src(X))


def test_bare_state_dict_and_prefixless_keys_are_accepted(tmp_path):
    src = randomised(TiedModel(), 0)
    path = tmp_path / "bare.pt"
    torch.save(src.state_dict(), path)
    assert set(read_state_dict(path)) == set(src.state_dict())


def test_any_subset_of_shared_names_is_enough(tmp_path):
    src = randomised(TiedModel(), 0)
    sd = {
        k: v.clone()
        for k, v in src.state_dict().items()
        if not k.startswith(("decoder_norm.", "_bbox_embed.", "bbox_embed.0.", "decoder.bbox_embed."))
    }
    assert "decoder.norm.weight" in sd and "bbox_embed.1.layers.0.weight" in sd
    dst = randomised(TiedModel(), 1)
    load_into(dst, sd, "subset")
    assert torch.equal(dst(X), src(X))
    assert torch.equal(dst.decoder_norm.weight, src.decoder_norm.weight)


def test_shared_names_in_file_fill_an_untied_model(tmp_path):
    # The model knows decoder_norm and _bbox_embed only; the file also stores their other (shared) names.
    src = randomised(TiedModel(), 0)
    path = tmp_path / "model.pth"
    torch.save(official_format(src), path)
    dst = randomised(TiedModel(tie=False), 1)
    load_into(dst, read_state_dict(path), str(path))
    assert torch.equal(dst(X), src(X))


def test_unshared_alias_copies_need_the_alias_table():
    src = randomised(TiedModel(), 0)
    sd = {k: v.clone() for k, v in src.state_dict().items()}  # clones: the file no longer shows the sharing
    dst = TiedModel(tie=False)
    with pytest.raises(CheckpointError, match=r"decoder\.norm\.weight"):
        load_into(dst, sd, "clones")
    aliases = {
        "decoder_norm.weight": ["decoder.norm.weight"],
        "decoder_norm.bias": ["decoder.norm.bias"],
    }
    for part in ("layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"):
        aliases[f"_bbox_embed.{part}"] = [f"bbox_embed.{i}.{part}" for i in range(2)] + [
            f"decoder.bbox_embed.{i}.{part}" for i in range(2)
        ]
    load_into(dst, sd, "clones", aliases=aliases)
    assert torch.equal(dst(X), src(X))


def test_shared_names_with_different_values_are_rejected():
    sd = {k: v.clone() for k, v in randomised(TiedModel(), 0).state_dict().items()}
    sd["decoder.norm.weight"] += 1.0
    with pytest.raises(CheckpointError) as info:
        load_into(TiedModel(), sd, "conflict.pth")
    assert "decoder_norm.weight" in str(info.value) and "decoder.norm.weight" in str(info.value)


def test_wrong_architecture_lists_missing_unexpected_and_mis_shaped_keys():
    sd = {k: v.clone() for k, v in TiedModel().state_dict().items()}
    del sd["backbone.1.bias"]
    sd["backbone.2.weight"] = torch.zeros(8)
    sd["backbone.0.weight"] = torch.zeros(16, 3)
    model = TiedModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_into(model, sd, "/ckpt/other.pth")
    msg = str(info.value)
    assert "/ckpt/other.pth" in msg
    assert re.search(r"1 missing keys:\s+backbone\.1\.bias", msg)
    assert re.search(r"1 unexpected keys:\s+backbone\.2\.weight", msg)
    assert "backbone.0.weight: expected (8, 3), found (16, 3)" in msg
    assert "another architecture" in msg
    # nothing was written into the model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_missing_shared_tensor_is_reported_once_with_all_its_names():
    sd = {k: v for k, v in TiedModel().state_dict().items() if not k.endswith("norm.bias")}
    with pytest.raises(CheckpointError) as info:
        load_into(TiedModel(), sd, "x")
    assert re.search(r"1 missing keys:\s+decoder_norm\.bias = decoder\.norm\.bias", str(info.value))


def test_long_key_lists_are_truncated():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(30))

    with pytest.raises(CheckpointError) as info:
        load_into(Wide(), {}, "empty")
    msg = str(info.value)
    assert "60 missing keys" in msg and "... and 45 more" in msg
    assert len(msg.splitlines()) < 25


def test_prefixed_keys_passed_directly_get_a_hint():
    sd = {f"model.{k}": v for k, v in TiedModel().state_dict().items()}
    with pytest.raises(CheckpointError, match="read_state_dict"):
        load_into(TiedModel(), sd, "raw")


def test_non_persistent_buffers_are_not_expected_but_tolerated():
    src = randomised(TiedModel(), 0)
    sd = dict(src.state_dict())
    assert "pixel_mean" not in sd
    load_into(TiedModel(), sd, "without")
    sd["pixel_mean"] = torch.zeros(3)
    dst = TiedModel()
    load_into(dst, sd, "with")
    assert torch.equal(dst.pixel_mean, torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_raises(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    src = randomised(TiedModel(), 0)
    if suffix == ".pth":
        torch.save(official_format(src), path)
    else:
        save_safetensors(src, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    assert "download it again" in str(info.value)


def test_garbage_and_non_checkpoints_raise(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth"):
        read_state_dict(text)

    a_list = tmp_path / "list.pth"
    torch.save([1, 2, 3], a_list)
    with pytest.raises(CheckpointError, match="list.pth.*not a state dict"):
        read_state_dict(a_list)

    mixed = tmp_path / "mixed.pth"
    torch.save({"model": {"a.weight": torch.zeros(2), "iteration": 5}}, mixed)
    with pytest.raises(CheckpointError, match="iteration"):
        read_state_dict(mixed)

    # arbitrary pickled objects are refused, never executed
    obj = tmp_path / "object.pth"
    torch.save({"model": argparse.Namespace(a=1)}, obj)
    with pytest.raises(CheckpointError, match="object.pth.*weights-only"):
        read_state_dict(obj)

    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pth")


def test_metadata_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="str"):
        save_safetensors(TiedModel(), tmp_path / "m.safetensors", metadata={"epoch": 3})
    assert not (tmp_path / "m.safetensors").exists()


def test_official_mini_checkpoint_keeps_its_sharing(reference_dir):
    sd = read_state_dict(reference_dir / "miniT_ckpt.pth")
    assert len(sd) == 310 and not any(k.startswith("model.") for k in sd)
    norm = sd["sem_seg_head.predictor.decoder_norm.weight"]
    alias = sd["sem_seg_head.predictor.decoder.norm.weight"]
    assert norm.data_ptr() == alias.data_ptr()

    class Predictor(nn.Module):  # holds the shared norm under one name only
        def __init__(self):
            super().__init__()
            self.decoder_norm = nn.LayerNorm(norm.shape[0])

    wrapper = nn.Module()
    wrapper.sem_seg_head = nn.Module()
    wrapper.sem_seg_head.predictor = Predictor()
    subset = {k: v for k, v in sd.items() if ".decoder_norm." in k or ".decoder.norm." in k}
    assert len(subset) == 4
    load_into(wrapper, subset, "miniT_ckpt.pth")
    assert torch.equal(wrapper.sem_seg_head.predictor.decoder_norm.weight, norm)
