"""Datasets: the registry, raw-data acquisition, converters to the MVTec layout, the reader and the protocol."""
