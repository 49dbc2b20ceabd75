"""The served-form cache is shared by the worker's thread and its model-loading thread:
each model gets exactly one served form, whichever thread asks first."""

from __future__ import annotations

import threading

import torch

from streamfuse.models.config import default_config
from streamfuse.models.encoders import create_model
from streamfuse.models.preprocess import example_input
from streamfuse.models.runtime import served_forward


def test_two_threads_building_served_forms_get_the_same_one_per_model():
    cfg = default_config("series", ["ok", "bad"], series_len=16)
    torch.manual_seed(0)
    models = [create_model(cfg).eval() for _ in range(4)]
    x = example_input(cfg)
    got: dict[int, list] = {i: [] for i in range(len(models))}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def build(order: list[int]) -> None:
        start.wait()
        try:
            for i in order:
                got[i].append(served_forward(models[i], x))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(order,)) for order in
               (list(range(4)), list(reversed(range(4))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert all(len(fs) == 2 and fs[0] is fs[1] for fs in got.values())
