"""Layer 1, models: the network and what transforms its weights. `gpt_config` (GPTConfig and the named
variants), `gpt` (the Flax GPT-2: layers, the tied head, the KV cache, the scan layout), `sharding`
(the mesh and logical-axis rules), `lora` (adapter math and PEFT's file format), `quantize` (Qwix int8).

Imports: core.
"""
