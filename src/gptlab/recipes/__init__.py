"""Measured choices kept apart from the mechanism: presets and the corpus sizing rules."""
