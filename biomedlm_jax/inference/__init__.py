"""Layer 3, inference: running a trained model. `sampling` (greedy, top-k / top-p, n-gram bans),
`generate` (static-batch KV-cache decoding), `engine` (continuous batching over slots), `scoring`
(the pad-to-batch loop behind every scorer).

Imports: core, models, data, formats. Not training.
"""
