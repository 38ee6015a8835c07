"""Ingestion on a distributed engine (Ray): many decoding workers and GPU encoders, one writer.

Import :mod:`rscir.distributed.ray_ingest` explicitly; Ray is imported only when it is used.
"""
