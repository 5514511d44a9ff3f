"""Inference servers that hold the current policy and take new weights after every step."""

from atropos_verl.engines.base import EngineError, InferenceReplica, ReplicaSpec
from atropos_verl.engines.sglang import SGLangReplica
from atropos_verl.engines.vllm import PauseMode, VLLMReplica

__all__ = ["EngineError", "InferenceReplica", "PauseMode", "ReplicaSpec", "SGLangReplica", "VLLMReplica"]
