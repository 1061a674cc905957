"""Offline training package: dataset loaders, the training recipe (Trainer), evaluation, distillation,
weight averaging and sweeps. Serving code (model.scorer, model.streaming, ...) never imports it."""
