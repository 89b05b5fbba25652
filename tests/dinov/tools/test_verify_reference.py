"""The whole model against the official implementation: every tensor of the reference io files."""

import pytest

from dinov.tools import verify_reference


@pytest.mark.parametrize("name", ["miniT", "miniL"])
def test_every_reference_tensor_matches(reference_dir, name, capsys):
    failures = verify_reference.verify_io(
        reference_dir / f"{name}_ckpt.pth", reference_dir / f"{name}_config.json", reference_dir / f"{name}_io.pt"
    )
    report = capsys.readouterr().out
    assert failures == [], report
    # Every stage was recomputed and judged, not skipped.
    for stage in ("tgt_backbone_res5", "tgt_multi_scale_3", "content_label_avg2", "openset3_raw_aux1_pred_logits",
                  "openset_mask_logits", "refer_selected_index", "refer_mask_logits", "click_raw_pred_ious"):
        assert f"{stage} " in report and "MISSING" not in report


@pytest.mark.parametrize("manifest, preset", [("manifest_swinT.json", "swin_t"), ("manifest_swinL.json", "swin_l")])
def test_presets_match_the_release_manifests(reference_dir, manifest, preset):
    assert verify_reference.verify_manifest(reference_dir / manifest, preset) == []


def test_a_wrong_preset_is_reported(reference_dir):
    problems = verify_reference.verify_manifest(reference_dir / "manifest_swinT.json", "swin_l")
    assert any("shape of model.backbone.patch_embed.proj.weight" in p for p in problems)


def test_command_exit_codes(reference_dir):
    args = ["--checkpoint", str(reference_dir / "miniT_ckpt.pth"), "--config", str(reference_dir / "miniT_config.json"),
            "--io", str(reference_dir / "miniT_io.pt")]
    assert verify_reference.main(args) == 0
    # The miniT checkpoint in the miniL architecture must fail loudly, not pass.
    bad = ["--checkpoint", str(reference_dir / "miniT_ckpt.pth"), "--config", str(reference_dir / "miniL_config.json"),
           "--io", str(reference_dir / "miniL_io.pt")]
    with pytest.raises(ValueError, match="miniT_ckpt.pth"):
        verify_reference.main(bad)
