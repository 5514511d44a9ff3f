"""Errors of the serving side, shared by replicas, transports and the weight sync."""


class EngineError(RuntimeError):
    """A replica failed to start, answer or apply a control call; the message names the replica."""
