"""Training, kept apart from the library as open_clip keeps its trainer: the loop (`loop.train`),
its settings (`config.TrainConfig`), the optimizer and LR schedule (`optim`), the state a
checkpoint carries (`state`) and process groups for torchrun (`distributed`).

Modules are imported by name; this package imports nothing, so reading `TrainConfig` does not
load torch.
"""
