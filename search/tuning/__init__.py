"""Where the study is written: the space, the deadline, trial outcomes, progress, and the Ray
adapter."""
