"""The AHL method on a trained base model: the feature cache, HADG's tasks, CDL's adaptation, psi, the training loop."""
