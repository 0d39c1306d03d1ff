"""biomedlm-jax: BioMedLM reimplemented in JAX/Flax.

The top-level modules are the commands (`python -m biomedlm_jax.pretrain`, `finetune_mcqa`,
`finetune_seq2seq`, `generate`, `convert`, `prepare_data`, `tokenizer`, `checkpoint`, `evaluate_mcqa`,
`evaluate_lm`, `lm_eval`, `demo`, `bench`, `bench_inference`, `bench_prepare`, `configdoc`): each parses
flags and calls the library. The library is in layers, each a folder that imports only from layers
below it (docs/architecture.md, enforced by tests/test_architecture.py):

    core -> models, data -> formats -> training, inference -> tasks -> evaluation, workflows -> benchmarks
"""
