"""AHL (Anomaly Heterogeneity Learning, CVPR 2024) on DRA and DevNet: the library behind the DVC pipeline."""

__version__ = "0.1.0"
