"""Offline medical tasks for the lm-evaluation-harness: the prompts and metrics of its built-in `pubmedqa`,
`medqa_4options`, `medmcqa` and `mmlu_<subject>` tasks, on local copies of the data.

Each task's `custom_dataset` reads the files named in the harness's `--metadata` JSON (keys below),
through biomedlm_jax's own loaders (so every format `mcqa_data.py` reads works, BioMedLM's `*_hf` files
included), and returns the fields the built-in prompt functions use:

| task | metadata key | file | fields |
|---|---|---|---|
| pubmedqa_local | pubmedqa (default: ./data/pubmedqa/ori_pqal.json, the copy shipped in the checkout) | ori_pqal.json | QUESTION, CONTEXTS, final_decision |
| medqa_4options_local | medqa (test), medqa_train (few-shot, optional) | phrases_no_exclude_*.jsonl | sent1, ending0-3, label |
| medmcqa_local | medmcqa (dev = the harness's test split), medmcqa_train (optional) | MedMCQA JSON lines | question, opa-opd, cop (0-3) |
| mmlu_<subject>_local | mmlu | an MMLU folder with <subject>_test.csv and <subject>_dev.csv | question, choices, answer |
"""
from __future__ import annotations

import glob
import os

import datasets

from biomedlm_jax.core import errors
from biomedlm_jax.data import readers
from biomedlm_jax.tasks import mcqa_data

# The copy shipped in the checkout's data/ folder, relative to the current directory (the harness run
# from the checkout); anywhere else pass --metadata='{"pubmedqa": "PATH"}'.
SHIPPED_PUBMEDQA = os.path.join("data", "pubmedqa", "ori_pqal.json")


def _path(kwargs: dict, key: str, what: str) -> str:
    path = kwargs.get(key)
    if not path:
        raise ValueError(f"no {what} file: pass --metadata='{{\"{key}\": \"PATH\"}}' with PATH the {what}")
    return path


def _dataset(splits: dict) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items() if rows})


# ---- PubMedQA (the harness's pubmedqa: bigbio pubmed_qa_labeled_fold0_source) -----------------------


def load_pubmedqa(**kwargs) -> datasets.DatasetDict:
    path = kwargs.get("pubmedqa") or SHIPPED_PUBMEDQA
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: pass --metadata='{{\"pubmedqa\": \"PATH\"}}' with PATH PubMedQA's "
                                "ori_pqal.json (run from the biomedlm-jax checkout, its data/pubmedqa copy is the default)")
    data = readers.read_json(path)

    def rows(split):
        return [{"pubid": i.id, "QUESTION": data[i.id]["QUESTION"], "CONTEXTS": list(data[i.id]["CONTEXTS"]),
                 "final_decision": data[i.id]["final_decision"]} for i in mcqa_data.load_pubmedqa(path, split)]

    return _dataset({"train": rows("train"), "validation": rows("dev"), "test": rows("test")})


def pubmedqa_doc_to_text(doc) -> str:  # lm_eval/tasks/pubmedqa/preprocess_pubmedqa.py
    ctxs = "\n".join(doc["CONTEXTS"])
    return "Abstract: {}\nQuestion: {}\nAnswer:".format(ctxs, doc["QUESTION"])


# ---- MedQA 4 options (the harness's medqa_4options: GBaker/MedQA-USMLE-4-options-hf) ----------------


def _medqa_rows(path: str) -> list[dict]:
    out = []
    for n, i in enumerate(mcqa_data.load_task_file("medqa", path)):
        if len(i.options) != 4:
            raise errors.DataError(f"{i.where}: {len(i.options)} options; medqa_4options needs 4")
        out.append({"id": f"{n}", "sent1": i.question, "sent2": i.header,
                    **{f"ending{k}": o for k, o in enumerate(i.options)}, "label": i.answer})
    return out


def load_medqa(**kwargs) -> datasets.DatasetDict:
    splits = {"test": _medqa_rows(_path(kwargs, "medqa", "MedQA-USMLE 4-option test (phrases_no_exclude_test.jsonl)"))}
    if kwargs.get("medqa_train"):
        splits["train"] = _medqa_rows(kwargs["medqa_train"])
    return _dataset(splits)


def medqa_doc_to_text(doc) -> str:  # lm_eval/tasks/medqa/preprocess_medqa.py
    option_choices = {"A": doc["ending0"], "B": doc["ending1"], "C": doc["ending2"], "D": doc["ending3"]}
    answers = "".join((f"{k}. {v}\n") for k, v in option_choices.items())
    return f"Question: {doc['sent1']}\n{answers}Answer:"


def medqa_doc_to_target(doc) -> int:
    return doc["label"]


# ---- MedMCQA (the harness's medmcqa: openlifescienceai/medmcqa, scored on its validation split) ----


def _medmcqa_rows(path: str) -> list[dict]:
    return [{"id": i.id, "question": i.question, **dict(zip(("opa", "opb", "opc", "opd"), i.options)), "cop": i.answer}
            for i in mcqa_data.load_task_file("medmcqa", path)]


def load_medmcqa(**kwargs) -> datasets.DatasetDict:
    splits = {"validation": _medmcqa_rows(_path(kwargs, "medmcqa", "MedMCQA dev set (dev.json)"))}
    if kwargs.get("medmcqa_train"):
        splits["train"] = _medmcqa_rows(kwargs["medmcqa_train"])
    return _dataset(splits)


def medmcqa_doc_to_text(doc) -> str:  # lm_eval/tasks/medmcqa/utils_medmcqa.py
    option_choices = {"A": doc["opa"], "B": doc["opb"], "C": doc["opc"], "D": doc["opd"]}
    prompt = "Question: " + doc["question"] + "\nChoices:\n"
    for choice, option in option_choices.items():
        prompt += f"{choice.upper()}. {option}\n"
    prompt += "Answer:"
    return prompt


# ---- MMLU medical subjects (the harness's mmlu_<subject>: cais/mmlu, few-shot from dev) ------------


def _mmlu(subject: str, kwargs: dict) -> datasets.DatasetDict:
    folder = _path(kwargs, "mmlu", "MMLU data folder (holding <subject>_test.csv and <subject>_dev.csv)")
    splits = {}
    for split in ("test", "dev"):
        files = glob.glob(os.path.join(folder, "**", f"{subject}_{split}.csv"), recursive=True)
        if files:
            splits[split] = [{"question": i.question, "subject": subject, "choices": list(i.options), "answer": i.answer}
                             for i in mcqa_data.load_mmlu(sorted(files)[0])]
    if "test" not in splits:
        raise FileNotFoundError(f"{folder}: no {subject}_test.csv")
    return _dataset(splits)


def load_mmlu_anatomy(**kwargs):
    return _mmlu("anatomy", kwargs)


def load_mmlu_clinical_knowledge(**kwargs):
    return _mmlu("clinical_knowledge", kwargs)


def load_mmlu_college_biology(**kwargs):
    return _mmlu("college_biology", kwargs)


def load_mmlu_college_medicine(**kwargs):
    return _mmlu("college_medicine", kwargs)


def load_mmlu_medical_genetics(**kwargs):
    return _mmlu("medical_genetics", kwargs)


def load_mmlu_professional_medicine(**kwargs):
    return _mmlu("professional_medicine", kwargs)
