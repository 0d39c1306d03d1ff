"""Layer 6, planning: what a run needs on hardware this host does not have, from the compiler.
`topology` (Cloud TPU slices by name, their chips' published figures, libtpu's compile-only devices),
`programs` (a config's train step and the decode engine's step, built from shapes and lowered for any
devices), `hlo` (collective bytes and loop-carried bytes read from optimized HLO), `report` (HBM, FLOPs,
collectives, the step-time bound, the table), `fit` (the micro-batch and remat search), `check`
(what `python -m biomedlm_jax.aot` runs).

Imports: every library layer below it. The entry point `aot` imports `check`, `fit`, `report` and
`topology`.
"""
