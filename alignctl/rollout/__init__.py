"""Online rollouts: the typed rollout batch and batched generation."""
