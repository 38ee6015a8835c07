"""Benchmarks: the PatternCom composed-retrieval protocol and real-image retrieval benchmarks."""
