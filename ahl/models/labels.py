"""The three kinds of training image, as the heads' losses tell them apart: 0 = normal, 1 = seen (labelled)
anomaly, 2 = pseudo anomaly."""

NORMAL, SEEN, PSEUDO = 0, 1, 2
