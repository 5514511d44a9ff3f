"""Talking to Atropos: the trajectory-API client and a helper that runs the API server."""

from atropos_verl.atropos.api_server import ApiServerProcess, ApiServerStartError, free_port
from atropos_verl.atropos.client import ApiStatus, AtroposAPIError, AtroposClient, TrainerRegistration

__all__ = [
    "ApiServerProcess",
    "ApiServerStartError",
    "ApiStatus",
    "AtroposAPIError",
    "AtroposClient",
    "TrainerRegistration",
    "free_port",
]
