"""The base models: backbones, scoring heads, the deviation loss, DRA and DevNet, their checkpoints and their
training."""
