"""Concurrent encodings batched within a collection window give each caller what it would get alone."""

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dinov.build import load_model
from dinov.predictor import DINOvPredictor
from dinov.transforms import InputError, ResizeConfig
from labelstudio_backend.runtime.batching import EncodeBatcher


@pytest.fixture(scope="module")
def predictor(reference_dir):
    model, _, _ = load_model(reference_dir / "miniT_ckpt.pth")
    return DINOvPredictor(model, resize=ResizeConfig(shortest_edge=96, max_size=160))


def images(count, size=(90, 120)):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(count)]


def encode_concurrently(batcher, inputs):
    results, errors = [None] * len(inputs), [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def work(i):
        start.wait()
        try:
            results[i] = batcher.encode(inputs[i])
        except Exception as e:
            errors[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_concurrent_requests_are_batched_and_equal_one_by_one(predictor):
    inputs = images(5) + images(1, size=(120, 90))  # five of one size, one of another
    batcher = EncodeBatcher(predictor, window_ms=300, max_batch=8)
    results, errors = encode_concurrently(batcher, inputs)
    assert errors == [None] * len(inputs)
    assert batcher.batches[0] > 1, batcher.batches  # the window collected several requests into one call
    assert sum(batcher.batches) == len(inputs)
    for image, got in zip(inputs, results):
        alone = predictor.encode_image(image)
        assert got.image_size == alone.image_size
        assert torch.allclose(got.mask_features, alone.mask_features, atol=1e-4)


def test_full_batches_start_at_once_and_the_rest_follow(predictor):
    batcher = EncodeBatcher(predictor, window_ms=2000, max_batch=2)
    results, errors = encode_concurrently(batcher, images(5))
    assert errors == [None] * 5 and all(r is not None for r in results)
    assert max(batcher.batches) <= 2 and sum(batcher.batches) == 5


def test_no_window_encodes_one_by_one(predictor):
    batcher = EncodeBatcher(predictor, window_ms=0)
    results, _ = encode_concurrently(batcher, images(3))
    assert list(batcher.batches) == [1, 1, 1] and all(r is not None for r in results)


def test_a_bad_image_fails_only_its_own_request(predictor):
    inputs = images(3)
    inputs[1] = np.zeros((20, 20, 4), np.uint8)  # not RGB
    batcher = EncodeBatcher(predictor, window_ms=300)
    results, errors = encode_concurrently(batcher, inputs)
    assert isinstance(errors[1], InputError)
    assert errors[0] is None and errors[2] is None and results[0] is not None and results[2] is not None


class ImagesByUrl:
    """The runtime's image loader for these tests: a fixed image per URL."""

    def __init__(self, by_url):
        self.by_url = by_url

    def load(self, url, task_id=None):
        return self.by_url[url]


@pytest.mark.parametrize("window_ms, batched", [(200.0, True), (None, False)])
def test_runtime_encodes_concurrent_requests_in_one_batch_when_a_window_is_set(tmp_path, predictor, window_ms,
                                                                              batched):
    """BATCH_WINDOW_MS set: concurrent requests of the backend share encode_images calls, each getting the
    features it would get alone; unset on the CPU: one encoding per request, as before."""
    from labelstudio_backend.runtime.runtime import Runtime
    from labelstudio_backend.settings import Settings

    inputs = images(4)
    by_url = {f"http://images/{i}.png": image for i, image in enumerate(inputs)}
    settings = Settings(model_dir=tmp_path, batch_window_ms=window_ms, max_batch=8)
    runtime = Runtime(settings, model_factory=lambda s: predictor, store=object(), images=ImagesByUrl(by_url))
    try:
        results, errors = encode_concurrently(SimpleNamespace(encode=lambda url: runtime.encode(url, None)),
                                              list(by_url))
        assert errors == [None] * 4
        batches = list(runtime.batcher(predictor).batches)
        assert sum(batches) == 4
        assert (max(batches) > 1) == batched, batches
        for image, result in zip(inputs, results):
            alone = predictor.encode_image(image)
            for got, want in zip(result.multi_scale_features, alone.multi_scale_features):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    finally:
        runtime.shutdown()
