"""A task that could not be predicted is answered `[]` (issue 20, item 8): Label Studio stores nothing for it and
asks again; the reason is in the log. Once its image exists, the same call predicts it."""

from __future__ import annotations

import logging

from tests.backend.http.test_app import (
    LS,
    SCENES,
    Backend,
    png,
    regions_by_label,
    same_masks,
    scene_image,
    scribble_and_box_on_a,
    task,
)


def test_missing_image_is_answered_with_nothing_then_predicted_once_it_exists(tmp_path, caplog):
    backend = Backend(tmp_path)
    try:
        backend.setup()
        scribble_and_box_on_a(backend)
        backend.drain()
        missing = {"id": 5, "project": 7, "data": {"image": "/data/upload/7/later.png"}}
        backend.http.register_uri("GET", f"{LS}/data/upload/7/later.png", status_code=404)
        with caplog.at_level(logging.WARNING):
            first = backend.predict([missing, task(3, "c")])
        assert first.status_code == 200, first.json
        assert first.json["results"][0] == []  # not {"result": [], "score": 0.0, ...}: that one LS would keep
        assert first.json["results"][1]["result"]  # the other task is predicted
        assert "task 5: no prediction" in caplog.text and "404" in caplog.text

        backend.http.register_uri("GET", f"{LS}/data/upload/7/later.png", content=png(scene_image("c")))
        second = backend.predict([missing])
        found = regions_by_label(second.json["results"][0])
        assert same_masks(found["Red"], SCENES["c"]["red"])
    finally:
        backend.runtime.shutdown()
