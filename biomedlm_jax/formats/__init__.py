"""Layer 2, formats: weights in and out. `sources` (the `hf:DIR` / `orbax:WORKDIR` / `peft:DIR` parser),
`hf_config` and `hf` (HF GPT-2 / BioMedLM config.json and safetensors, classifier heads), `checkpoint`
(a run's orbax workdir, damaged-step fallback, verify, a LoRA run's frozen base), `damage` (array
digests, one-line damage reports, quiet abandoned reads), `gguf` (llama.cpp files), `loading` (any
source to model, params and tokenizer).

Imports: core, models, data.
"""
