"""Concurrent image encodings collected into batches: on a GPU, eight images cost little more than one.

    batcher = EncodeBatcher(predictor, window_ms=5, max_batch=8)
    encoded = batcher.encode(image)          # from any number of threads at once

The first request to arrive waits up to `window_ms` for others (or until `max_batch` are waiting), then encodes
all of them with `DINOvPredictor.encode_images`, which batches images of the same padded size and gives each
exactly the features it would get alone; every caller gets its own result (or its own exception). With
`window_ms=0` each request is encoded at once, as before (the right setting on a CPU, where a batch takes as
long as its images one by one).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any, Sequence


class EncodeBatcher:
    def __init__(self, predictor: Any, window_ms: float = 5.0, max_batch: int = 8,
                 lock: threading.Lock | None = None) -> None:
        if window_ms < 0 or max_batch < 1:
            raise ValueError(f"window_ms must be >= 0 and max_batch >= 1, got {window_ms} and {max_batch}")
        self.predictor = predictor
        self.window_s = window_ms / 1000.0
        self.max_batch = max_batch
        self.lock = lock  # the device lock the caller serialises model work with, if any
        self._pending: list[tuple[Any, Future]] = []
        self._collecting = False
        self._cond = threading.Condition()
        self.batches: deque[int] = deque(maxlen=1024)  # sizes of the latest batches (for tests and metrics)

    def encode(self, image: Any) -> Any:
        """The EncodedImage of one image, computed in a batch with whatever arrived in the same window."""
        if self.window_s == 0:
            return self._run([image])[0]
        future: Future = Future()
        with self._cond:
            self._pending.append((image, future))
            leader = not self._collecting
            if leader:
                self._collecting = True
            else:
                self._cond.notify_all()  # the leader may stop waiting once the batch is full
        if leader:
            self._lead()
        return future.result()

    def _lead(self) -> None:
        deadline = time.monotonic() + self.window_s
        with self._cond:
            while len(self._pending) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            # requests beyond a full batch start the next window with a new leader among them
            self._collecting = False
            if self._pending:
                self._collecting = True
                threading.Thread(target=self._lead, name="dinov-batch-leader", daemon=True).start()
        try:
            results = self._run([image for image, _ in batch])
        except Exception:
            # one bad image must not fail the others: encode them one by one to give each its own answer
            for image, future in batch:
                try:
                    future.set_result(self._run([image])[0])
                except Exception as e:
                    future.set_exception(e)
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)

    def _run(self, images: Sequence[Any]) -> list[Any]:
        with self.lock if self.lock is not None else nullcontext():
            self.batches.append(len(images))
            if len(images) == 1:
                return [self.predictor.encode_image(images[0])]
            return self.predictor.encode_images(images, batch_size=self.max_batch)
