"""Search: space, Ray Tune / Optuna adapter, CLIs."""
