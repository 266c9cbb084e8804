"""The procedural text-to-video world and the small model trained on it."""
