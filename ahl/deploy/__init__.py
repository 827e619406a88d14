"""Deployment: `ahl predict` and the `ahl` console script."""
