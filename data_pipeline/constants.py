"""Names the parsers need without importing numpy, pandas or scikit-learn."""

STRATEGIES = ("slide", "random")  # fold strategies: slide-grouped, or leaky random patches
