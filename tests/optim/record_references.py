"""Record Keras's results for every conformance case into tests/optim/keras_references.npz.

Run from the repository root, in the test environment (``pip install -e ".[test]"``, which
pins the Keras the references come from)::

    .venv/bin/python -m tests.optim.record_references

It takes about a minute on 2 cores. Run it again (and commit the file) whenever
tests/optim/test_references.py says the references are stale: after a change of the case
table, the gradient streams, the Keras pin, this script or the way the harness drives Keras.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "numpy")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> int:
    import keras

    from tests.optim import references
    from tests.optim.harness import run_keras

    if keras.__version__ != references.KERAS_VERSION:
        print(
            f"keras {keras.__version__} is installed; the references come from keras=="
            f"{references.KERAS_VERSION} (pyproject's test extra)",
            file=sys.stderr,
        )
        return 1
    if keras.backend.backend() != "numpy":
        print(f"the Keras backend is {keras.backend.backend()!r}, not numpy", file=sys.stderr)
        return 1
    results = {}
    for job in references.jobs():
        class_name, config, init, stream = job.inputs()
        key = references.input_key(class_name, config, init, stream)
        results[key] = run_keras(class_name, config, init, stream)
    references.save(results)
    size_kib = references.PATH.stat().st_size / 1024
    print(f"recorded {len(results)} cases into {references.PATH} ({size_kib:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
