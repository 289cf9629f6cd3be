"""Suite-wide setup: Keras (the reference implementation) runs on its numpy backend, and the
shared fixtures of tests/support are loaded."""

import os

os.environ.setdefault("KERAS_BACKEND", "numpy")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

pytest_plugins = ["tests.support.fixtures"]
