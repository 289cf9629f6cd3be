"""In-process servers (``create_server``) on 127.0.0.1:0, each with a raw stub to it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

import grpc
import numpy as np

from paramserve.server.app import RunningServer, create_server
from paramserve.server.config import ServerConfig
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import parameter_server_pb2_grpc as pb_grpc

from .models.tiny import initial_variables
from .wire import TIMEOUT_S, create_model_requests, pull, push_requests


class LocalServer:
    """A started in-process server: every attribute of its :class:`RunningServer` (``address``,
    ``port``, ``config``, ``core``, ``stop`` ...), the server itself as ``server``, and a raw
    stub to it (opened on first use) with which ``create``, ``push``, ``pull``, ``state`` and
    ``assert_unchanged`` speak the wire directly."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)

    @cached_property
    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.server.address)

    @cached_property
    def stub(self) -> pb_grpc.ParameterServerStub:
        return pb_grpc.ParameterServerStub(self.channel)

    def create(self, variables: dict[str, np.ndarray] | None = None, **kwargs: Any):
        variables = initial_variables() if variables is None else variables
        return self.stub.CreateModel(create_model_requests(variables, **kwargs), timeout=TIMEOUT_S)

    def push(self, grads, **kwargs: Any) -> pb.PushResponse:
        return self.stub.Push(iter(push_requests(grads, **kwargs)), timeout=TIMEOUT_S)

    def pull(self, **kwargs: Any):
        return pull(self.stub, **kwargs)

    def state(self) -> tuple[int, dict[str, np.ndarray]]:
        """Version and a copy of every weight (the 'before' of an error test)."""
        version, values = self.pull()
        return version, {k: np.array(v) for k, v in values.items()}

    def assert_unchanged(self, before: tuple[int, dict[str, np.ndarray]]) -> None:
        """The server still answers, at the same version with bit-identical weights."""
        version, values = self.state()
        assert version == before[0]
        assert values.keys() == before[1].keys()
        for name, value in values.items():
            np.testing.assert_array_equal(value, before[1][name], strict=True)

    def close(self) -> None:
        """Close the raw channel, if one was opened (the server keeps running)."""
        if "channel" in self.__dict__:
            self.channel.close()


class LocalServers:
    """Starts in-process servers from one set of defaults; :meth:`stop_all` stops them.

    ``defaults`` are configuration fields (limit fields by their own names); a value may be a
    function of the server's index (0, 1, ...), e.g. a checkpoint folder per server.
    """

    def __init__(self, defaults: Mapping[str, Any]) -> None:
        self.defaults = dict(defaults)
        self.started: list[LocalServer] = []

    def start(self, **changes: Any) -> LocalServer:
        index = len(self.started)
        settings = {"host": "127.0.0.1", "port": 0}
        settings.update((k, v(index) if callable(v) else v) for k, v in self.defaults.items())
        settings.update(changes)
        server = LocalServer(create_server(ServerConfig().replace(**settings)))
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.close()
            server.server.stop(0)


StartServer = Callable[..., LocalServer]
