"""What a run shows: metrics.jsonl, trackers, plots, the terminal's progress views."""
