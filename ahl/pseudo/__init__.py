"""Pseudo anomalies: CutPaste, CutMix, rotations (augment), DRAEM (draem) and AHL's per-family maker (maker)."""
