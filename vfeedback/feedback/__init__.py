"""Preference and ranking feedback: oracles backed by a Reward, a function or a person."""
