"""Inference servers that hold the current policy and take new weights after every step."""

from atropos_verl.serving.replicas.base import EngineError, InferenceReplica, ReplicaSpec
from atropos_verl.serving.replicas.sglang import SGLangReplica
from atropos_verl.serving.replicas.vllm import PauseMode, VLLMReplica

__all__ = ["EngineError", "InferenceReplica", "PauseMode", "ReplicaSpec", "SGLangReplica", "VLLMReplica"]
