"""Reinforcement-learning math and reward sources: KL penalties and controllers, advantages, rewards."""
