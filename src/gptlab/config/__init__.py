"""Configuration: the typed sections of a run, TOML files, dotted overrides, validation."""
