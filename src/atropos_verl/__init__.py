"""atropos-verl: train LLMs with verl on Atropos RL environments."""

__version__ = "0.1.0"
