"""Device-agnostic building blocks used in layer specs (norms, core attention)."""
