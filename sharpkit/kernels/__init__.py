"""Fused ops: one file per op holding its torch reference, Triton kernel and dispatch."""
