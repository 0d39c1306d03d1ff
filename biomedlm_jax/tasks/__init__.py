"""Layer 4, tasks: what the trainer is asked to learn besides plain language modelling. `mcqa_data`
(MCQA items and BioMedLM's token rows), `mcqa` (the choice / seqcls classifier heads, `MCQATask`),
`seq2seq` (answer-only loss rows, `Seq2SeqTask`, the ROUGE-L generation eval).

Imports: every layer below (core, models, data, formats, training, inference).
"""
