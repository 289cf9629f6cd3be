"""Run a real paramserve daemon for bench/step.py: async, one replica, Adam, ephemeral port.

Started as a subprocess by the benchmark. Builds the server with the public
``paramserve.server.app.create_server`` (the same code path as ``paramserve serve``), prints
``PORT <n>`` on stdout once it accepts calls, and stops when stdin closes (the benchmark,
which holds the other end, exited or died) or on SIGTERM/SIGINT. Other settings come from
``PARAMSERVE_*`` environment variables as the daemon takes them (``PARAMSERVE_APPLY_THREADS=2
python bench/step.py ...``), those above excepted; ``PARAMSERVE_DEVICE`` may pick the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)

    from paramserve.server.app import create_server
    from paramserve.server.config import ServerConfig, read_env

    env = read_env(os.environ)
    fixed = {
        "host": args.host,
        "port": args.port,
        # PARAMSERVE_DEVICE=gpu puts the model on the GPU (bench/gpu_check.sh); cpu otherwise.
        "device": env.get("device", "cpu"),
        "optimizer": "adam",
        "mode": "async",
        "replicas": 1,
        "checkpoint_dir": None,
        "snapshot_on_exit": False,
    }
    config = ServerConfig().replace(**{**env, **fixed})
    server = create_server(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while sys.stdin.buffer.read(1 << 16):
                pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    print(f"PORT {server.port}", flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
