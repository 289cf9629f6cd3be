"""Suite-wide setup: Keras (the reference implementation) runs on its numpy backend."""

import os

os.environ.setdefault("KERAS_BACKEND", "numpy")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
