"""Evaluation: the one scoring object (scorer), image and pixel metrics, thresholds, heatmaps, the reports."""
