"""Video analysis: sampled frames with timestamps -> per-window observations -> a timeline -> the answer."""
