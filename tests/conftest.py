"""Suite-wide setup: Keras (the reference implementation) runs on its numpy backend, the shared
fixtures of tests/support and the fuzz report are loaded, and under pytest-xdist each test file
runs whole on one worker (the fuzz suite, which shares three daemons, on one worker)."""

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "numpy")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

pytest_plugins = ["tests.support.fixtures", "tests.fuzz.report"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("xdist"):
        return
    root = config.rootpath
    for item in items:
        relative = item.path.relative_to(root)
        group = "tests/fuzz" if relative.parts[:2] == ("tests", "fuzz") else str(relative)
        item.add_marker(pytest.mark.xdist_group(group))
