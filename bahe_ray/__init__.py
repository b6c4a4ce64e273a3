"""BAHE (Behavior Aggregated Hierarchical Encoding) for LLM-based CTR prediction on Ray."""

__version__ = "0.1.0"
