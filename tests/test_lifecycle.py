"""runners/lifecycle.py's heap settling, which every worker calls once it has loaded its models."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_heap_freezes_what_is_loaded_and_collects_the_young_less_often(restore_gc):
    from runners.lifecycle import settle_heap

    gc.unfreeze()
    kept = [{"loaded": i} for i in range(1000)]  # stands for a loaded model
    _, middle, oldest = gc.get_threshold()
    settle_heap(20_000)
    assert gc.get_freeze_count() >= len(kept)
    assert gc.get_threshold() == (20_000, middle, oldest)
    before = gc.get_stats()[0]["collections"]
    garbage = [[i] for i in range(5_000)]  # 5,000 young objects: no collection with 20,000
    assert gc.get_stats()[0]["collections"] == before
    del garbage


def test_every_worker_settles_its_heap_with_the_setting():
    """The API worker and each runner call settle_heap with SCORING_GC_YOUNG_OBJECTS."""
    from configuration import Settings
    from tests.harness import PROJECT

    assert Settings().gc_young_objects == 20_000
    call = "settle_heap(SETTINGS.gc_young_objects)"
    for path in (
        "service.py",
        "runners/preprocessor.py",
        "runners/xgboost_runner.py",
        "runners/sklearn_runner.py",
    ):
        source = (PROJECT / path).read_text()
        assert call in source and "gc.freeze()" not in source, path


def test_bind_apis_once_keeps_one_caller_per_api_on_the_instance(demo_models):
    """BentoML's per-request lookup (`getattr(instance, name).local`) finds the caller built
    once, and calling it runs the API."""
    import asyncio

    import numpy as np

    from runners.batching import bind_apis_once
    from runners.preprocessor import Preprocessor

    preprocessor = Preprocessor.inner()  # its __init__ binds its APIs
    for name in Preprocessor.apis:
        first = getattr(preprocessor, name)
        assert getattr(preprocessor, name) is first and first.local is first, name
    bind_apis_once(preprocessor)  # idempotent
    assert preprocessor.transform.local is preprocessor.transform
    from configuration import current_use_case

    example = current_use_case().matrix([current_use_case().examples[0]])[0]
    raw = np.array([[preprocessor.version, *example]], dtype=object)
    out = asyncio.run(preprocessor.transform.local(raw))
    assert out.shape == (1, preprocessor.width) and np.isfinite(out).all()
