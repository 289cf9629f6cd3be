"""What the tests share: server processes and in-process servers, models, replays, assertions.

- ``processes``: `paramserve serve` daemons read through their logs, worker processes, ports.
- ``servers``: in-process servers on 127.0.0.1:0, each with a raw stub (the ``start_server``
  fixture).
- ``wire``: requests and replies built and read with the raw generated stubs (no SDK).
- ``models``: the test models and the deterministic gradients pushed to them.
- ``replay``: what a server should have computed, replayed locally with optim_core.
- ``asserts``: bit-for-bit comparisons and expected gRPC errors.
- ``waiting``: bounded waits for conditions, never sleeps on a guess.
- ``credentials``: a test CA with certificates, and tokens files.
- ``lossy_proxy``: a TCP proxy that cuts connections by plan.
- ``workers``: worker bodies run in other processes.
- ``fixtures``: the pytest fixtures over these (a plugin loaded by tests/conftest.py).
"""
