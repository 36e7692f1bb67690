"""Names the parsers need without importing numpy, pandas or scikit-learn."""

STRATEGIES = ("slide", "random")  # fold strategies: slide-grouped, or leaky random patches
# k of the cross-validation folds: the search's defaults, which pcam-data folds follows
FOLDS_CPU = 3
FOLDS_GPU = 5
FOLD_SEED = 0  # fold assignment seed, frozen with a study (pcam-search --fold-seed)
