"""Layer 3, training: the one trainer and what it is made of. `trainer` (`train_and_evaluate`),
`task` (the `Task` interface and `LMTask`), `state` (the sharded train state), `checkpoints` (resume,
asynchronous saves, the best checkpoint), `optim`, `losses`, `metrics` (MFU, the metrics writer),
`distributed` (multi-process start-up), `configlib` / `configdoc` (run configs and their reference),
`cli` (the flags every training entry point shares).

Imports: core, models, data, formats. The trainer knows no task by name.
"""
