"""Layer 6, benchmarks: measurements that print numbers. `speed` (pipeline, tokenize, generate, train),
`memory` (fine-tuning memory from XLA's buffer assignment), `matrix` (rows under a time budget),
`inference` (continuous batching, int8, llama.cpp, int8's quality cost), `prepare` (corpus preparation).

Imports: every library layer. Entry points (the top-level modules) import nothing from here but
`bench`, `bench_inference` and `bench_prepare`.
"""
