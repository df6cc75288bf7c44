"""rankserve: take a trained transformer ranker to production on NVIDIA Triton Inference Server."""

__version__ = "0.1.0"
