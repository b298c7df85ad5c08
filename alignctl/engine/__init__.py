"""The training engine: a run shell shared by every algorithm, an offline epoch loop and an online rollout loop."""
