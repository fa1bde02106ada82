"""Training engine: ``train(cfg)`` (trainer), optimizers, schedules, checkpoints, metrics, precision, guards."""
