"""The CUDA path: the predictor on a GPU against the CPU, batched against single, and the backend serving on CUDA.

Marked `cuda` and skipped without a CUDA device; `scripts/gpu_check.sh` runs them on a GPU machine
(`pytest -m cuda`).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from dinov.build import load_model
from dinov.data.scenes import class_names, generate_scene
from dinov.predictor import DINOvPredictor
from dinov.transforms import ResizeConfig

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# float32 on both devices: cuDNN/cuBLAS sum in another order than the CPU (TF32 is off by default in torch)
TOL = 1e-3
DEVICE = "cuda"  # (a module constant, so that the backend test can be tried on the CPU by hand)


@pytest.fixture(scope="module")
def predictors(reference_dir):
    cpu_model, _, digest = load_model(reference_dir / "miniT_ckpt.pth")
    gpu_model, _, _ = load_model(reference_dir / "miniT_ckpt.pth")
    resize = ResizeConfig(shortest_edge=None)
    return (DINOvPredictor(cpu_model, device="cpu", resize=resize, checkpoint_id=digest),
            DINOvPredictor(gpu_model, device="cuda", resize=resize, autocast_dtype=None, checkpoint_id=digest))


@pytest.fixture(scope="module")
def io(reference_dir):
    return torch.load(reference_dir / "miniT_io.pt", map_location="cpu", weights_only=True)


def rgb(tensor):
    return tensor.permute(1, 2, 0).numpy().copy()


def test_predictor_on_cuda_equals_cpu(predictors, io):
    cpu, gpu = predictors
    target = rgb(io["tgt_image"])
    encoded = [p.encode_image(target) for p in predictors]
    assert encoded[1].mask_features.is_cuda
    assert torch.allclose(encoded[0].mask_features, encoded[1].mask_features.cpu(), atol=TOL)
    mask = io["ref_mask"][0].numpy() > 0
    reference = [p.encode_prompts(p.encode_image(rgb(io["ref_image"])), mask) for p in predictors]
    assert np.abs(reference[0] - reference[1]).max() < TOL
    generic = [p.segment_generic(e, [reference[0]]) for p, e in zip(predictors, encoded)]
    assert len(generic[0]) == len(generic[1]) > 0
    for a, b in zip(generic[0], generic[1]):
        assert (a.mask != b.mask).mean() < 1e-3 and abs(a.score - b.score) < TOL
    referring = [p.segment_referring(e, reference[0]) for p, e in zip(predictors, encoded)]
    for a, b in zip(referring[0], referring[1]):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.mask != b.mask).mean() < 1e-3
    clicks = [p.segment_interactive(e, points=io["click_points"][:1].numpy(), point_labels=[1])
              for p, e in zip(predictors, encoded)]
    assert np.allclose([c.predicted_iou for c in clicks[0].candidates],
                       [c.predicted_iou for c in clicks[1].candidates], atol=TOL)


def test_batched_encoding_equals_single_on_cuda(predictors, io):
    _, gpu = predictors
    images = [rgb(io["tgt_image"]), rgb(io["tgt_image"])[::-1].copy(), rgb(io["ref_image"])]
    for image, batched in zip(images, gpu.encode_images(images)):
        single = gpu.encode_image(image)
        assert torch.allclose(batched.mask_features, single.mask_features, atol=TOL)


def test_request_batching_on_cuda_equals_single(predictors, io):
    import threading

    from labelstudio_backend.runtime.batching import EncodeBatcher

    _, gpu = predictors
    images = [rgb(io["tgt_image"]), rgb(io["tgt_image"])[::-1].copy(), rgb(io["tgt_image"])[:, ::-1].copy()]
    batcher = EncodeBatcher(gpu, window_ms=200, max_batch=8)
    results = [None] * len(images)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher.encode(images[i])))
               for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert batcher.batches[0] > 1
    for image, got in zip(images, results):
        assert torch.allclose(got.mask_features, gpu.encode_image(image).mask_features, atol=TOL)


def test_bf16_autocast_on_cuda_agrees_with_float32():
    from dinov.tools.precision import bf16_agreement

    predictor = DINOvPredictor.from_checkpoint("demo", device="cuda", autocast_dtype=None)
    report = bf16_agreement(predictor, scenes=4)
    for kind in ("click", "generic", "referring"):
        assert report[kind]["mean_iou"] >= 0.95, report


def test_backend_serves_a_click_and_a_preannotation_on_cuda(tmp_path):
    from labelstudio_backend.http.app import create_app
    from labelstudio_backend.settings import Settings

    images = tmp_path / "images"
    images.mkdir()
    scenes = [generate_scene(10_000_000 + i, size=(240, 320), num_objects=(3, 5), classes=[0, 1]) for i in range(2)]
    for i, scene in enumerate(scenes):
        Image.fromarray(scene.image).save(images / f"{i}.png")
    labels = [class_names()[0], class_names()[1]]
    options = "".join(f'<Label value="{label}"/>' for label in labels)
    config = (f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{options}'
              f'</BrushLabels><KeyPointLabels name="kp" toName="image" smart="true">{options}</KeyPointLabels></View>')
    settings = Settings(model_dir=tmp_path / "model_dir", device=DEVICE, checkpoint="demo", local_files_root=images)
    app = create_app(settings=settings)
    runtime = app.extensions["dinov"]
    client = app.test_client()
    try:
        assert client.post("/setup", json={"project": "1.1", "schema": config}).status_code == 200
        from label_studio_sdk.converter import brush

        reference = scenes[0]
        region = {"id": "r1", "type": "brushlabels", "from_name": "tag", "to_name": "image",
                  "original_width": 320, "original_height": 240,
                  "value": {"format": "rle", "rle": brush.mask2rle(reference.masks[0].astype(np.uint8) * 255),
                            "brushlabels": [labels[int(reference.classes[0])]]}}
        annotation = {"id": 1, "task": 1, "project": 1, "result": [region], "updated_at": "2026-01-01T00:00:00Z"}
        hook = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": annotation,
                                             "task": {"id": 1, "data": {"image": "/data/local-files/?d=0.png"}},
                                             "project": {"id": 1, "label_config": config}})
        assert hook.status_code == 200
        runtime.background.submit(lambda: None).result(timeout=120)
        assert runtime.load_model().device.type == torch.device(DEVICE).type
        target = {"id": 2, "data": {"image": "/data/local-files/?d=1.png"}}
        body = {"tasks": [target], "project": "1.1", "label_config": config, "params": {"context": None}}
        answer = client.post("/predict", json=body)
        assert answer.status_code == 200, answer.json
        assert answer.json["results"][0]["result"], "pre-annotation found nothing"
        ys, xs = np.nonzero(scenes[1].masks[0])
        click = {"id": "k1", "type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
                 "original_width": 320, "original_height": 240,
                 "value": {"x": 100 * (xs.mean() + 0.5) / 320, "y": 100 * (ys.mean() + 0.5) / 240, "width": 0.5,
                           "keypointlabels": [labels[int(scenes[1].classes[0])]]}}
        started = time.perf_counter()
        answer = client.post("/predict", json={**body, "params": {"context": {"result": [click]}}})
        assert answer.status_code == 200, answer.json
        assert answer.json["results"][0]["result"], "the click gave no region"
        print(f"click on CUDA through the backend: {1000 * (time.perf_counter() - started):.0f} ms")
    finally:
        runtime.shutdown()
