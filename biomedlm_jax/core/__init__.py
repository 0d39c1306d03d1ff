"""Layer 0, core: what every other folder may use. `errors` (the exception types and the one line a
tool prints for them) and `paths` (local folders and object-store URLs through one interface).

Imports: nothing from biomedlm_jax.
"""
