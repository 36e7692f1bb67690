"""Where a trial trains: the engine, augmentation, losses, devices, metrics."""
