"""Layer 5, evaluation: scoring checkpoints. `mcqa_eval` (the paper-style MCQA table), `perplexity`
(loss, perplexity and bits per byte), `harness` (the lm-evaluation-harness backend) and its offline
medical task files in `lm_eval_tasks/`.

Imports: every layer below. Not workflows or benchmarks.
"""
