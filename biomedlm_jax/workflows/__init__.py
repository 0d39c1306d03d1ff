"""Layer 6, workflows: jobs that chain the layers. `convert` (checkpoints between HF, orbax, PEFT and
GGUF, MCQA classifiers with their heads) and `demo` (`make demo`'s pipeline end to end).

Imports: every layer below, and evaluation.
"""
