"""Optimized variants of the ranker: quantization, FP16, graph fusion, pruning + distillation, and
the accuracy gate and measurements that decide which of them serve."""
