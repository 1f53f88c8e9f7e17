"""``detc demo``: the built-in demo detector, its training recipe and its synthetic data."""
