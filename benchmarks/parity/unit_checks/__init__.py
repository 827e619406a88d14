"""The checks units.py runs, one module per component compared with the official code; each check returns its
table rows (helpers.Row). helpers.py holds what they share."""
