"""The paper's runs as data: Table 2's published numbers and the settings each of its two runs used
(`iterate.py --preset paper_llama | paper_gpt`).

What is read from the reference code is marked "reference"; what the paper and the code do not say
is inferred, and each inferred value says from what. The README's "Table 2 in one command" repeats
these notes. Nothing here runs anything: iterate.py applies a preset to its flags and prints it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mentalarena.errors import InputError

# Table 2 (METHOD.md §7, a second-hand transcription), accuracy %. QA: MedQA, MedMCQA, PubMedQA;
# mental health detection (IMHI): CAMS, dreaddit, Irf.
QA_COLUMNS = ("MedQA", "MedMCQA", "PubMedQA")
IMHI_COLUMNS = ("CAMS", "dreaddit", "Irf")
TABLE2_COLUMNS = QA_COLUMNS + IMHI_COLUMNS
TABLE2 = {
    "GPT-3.5-turbo": (64.16, 33.76, 44.68, 28.96, 49.03, 64.65),
    "GPT-3.5-turbo + MentalArena (iter 2)": (74.57, 91.08, 97.56, 32.80, 49.03, 64.65),
    "Llama-3-8B": (70.52, 42.04, 86.59, 25.12, 58.45, 45.76),
    "Llama-3-8B + MentalArena (iter 4)": (78.03, 50.32, 92.68, 29.60, 65.46, 52.25),
    "GPT-4o": (87.86, 74.20, 60.06, 27.68, 49.03, 64.65),
}
# The reference hard-codes this model for the health score, the principle choice and the extraction.
PAPER_JUDGE = "gpt-4-turbo-2024-04-09"
# IMHI accuracy for Table 2 over all rows: the rule sets that read every golden, the paper's labels
# (the MentaLLaMA classifiers, when given) first. The reference rules drop rows they cannot read
# (107 of CAMS's 625), so their accuracy is not over all rows; they are still reported beside.
TABLE2_IMHI_RULES = ("classifier_fixed", "fixed")


def published(columns=TABLE2_COLUMNS) -> dict[str, dict[str, float]]:
    """model -> column -> the published accuracy, for the columns asked."""
    return {model: {c: v for c, v in zip(TABLE2_COLUMNS, values) if c in columns} for model, values in TABLE2.items()}


@dataclass(frozen=True)
class Preset:
    """One of the paper's runs: iterate.py's flags and each stage's flags, with why each value."""
    name: str
    title: str
    flags: dict            # iterate.py's own flags
    stage_args: dict       # arena_args, finetune_args, qa_args, imhi_args: merged under the user's
    needs: tuple           # the flags naming data the user must fetch
    rows: tuple            # Table 2's rows this run is compared with: (before, after)
    notes: tuple = field(default=())  # (setting, value, source) for the printed table and the README


# The data a user must fetch (none of it is bundled): iterate.py's flags naming it
NEEDS = ("patients_file", "principles_file", "qa_data_dir", "imhi_test_dir")
# Self-play as the reference code ran it: every faithful mode the project keeps behind a flag.
_ARENA_REFERENCE = {
    "judge_model": PAPER_JUDGE,
    "encoder_model": "bert-base-uncased",  # its calibrated threshold is the reference's 0.9
    "feedback_mode": "reference", "extraction_parser": "reference", "score_parser": "reference",
    "illness_prompt": "reference", "emotion_format": "reference",
}
_IMHI = {"test_dataset": "IMHI", "datasets": "CAMS,dreaddit,Irf", "rules": "reference,fixed"}
_QA = {"tables": "main", "repeats": 5}
_COMMON_NOTES = (
    ("judge", PAPER_JUDGE, "reference: arena_med.py calls it by name for the score, principles and extraction"),
    ("self-play modes", "the reference's (encoder bert-base-uncased at 0.9, feedback dropped, reference extraction, "
     "score and illness prompts, emotions as a Python list)", "reference: arena_med.py"),
    ("fine-tuning data", "the reference's three questions, treatment question glued to the symptom",
     "reference: data_process.py / llama_finetune.py"),
    ("QA", "MedQA, MedMCQA, PubMedQA (the paper's subsets), 5 repeats, scored by rule R",
     "paper: Table 2 and its 5 repeats; reference: MedQA_eval.py"),
    ("IMHI", "CAMS, dreaddit, Irf of the instruction test set, accuracy over all rows",
     "inferred: Table 2's columns; the test set and labels are not named (MentaLLaMA's code, "
     "its classifiers when --imhi_args label_model_dir is given, else the fixed rules)"),
)

PRESETS = {
    "paper_llama": Preset(
        name="paper_llama", title="the paper's Llama run (Llama-3.1-8B-Instruct, 4 iterations, QLoRA)",
        flags={"backend": "open", "base_model": "meta-llama/Meta-Llama-3.1-8B-Instruct", "epochs": "4,5,7,7",
               "num_samples": 4, "judge_model": PAPER_JUDGE, "method": "qlora", "eval": "qa,imhi",
               "sft_questions": "reference"},
        stage_args={"arena_args": {k: v for k, v in _ARENA_REFERENCE.items() if k != "judge_model"},
                    "finetune_args": {"reference_glue": True, "lr_scheduler": "constant", "add_eos": False},
                    "qa_args": _QA, "imhi_args": _IMHI},
        needs=NEEDS,
        rows=("Llama-3-8B", "Llama-3-8B + MentalArena (iter 4)"),
        notes=(("model", "meta-llama/Meta-Llama-3.1-8B-Instruct",
                "reference: the evaluation commands of its README; METHOD.md §6"),
               ("epochs", "4, 5, 7, 7", "METHOD.md §1"),
               ("sessions per patient", "4", "inferred: the reference's Llama outputs hold 4 files of 106 "
                "records for iterations 1 and 3 (6 for iteration 4)"),
               ("training", "QLoRA NF4, r 64, alpha 16, lr 2e-4 constant, batch 4, no EOS added",
                "reference: llama_finetune.py"),
               *_COMMON_NOTES)),
    "paper_gpt": Preset(
        name="paper_gpt", title="the paper's GPT run (gpt-3.5-turbo-0125, 2 iterations, OpenAI fine-tuning)",
        flags={"backend": "openai", "base_model": "gpt-3.5-turbo-0125", "epochs": "4,6", "num_samples": 16,
               "judge_model": PAPER_JUDGE, "eval": "qa,imhi", "sft_questions": "reference"},
        stage_args={"arena_args": {k: v for k, v in _ARENA_REFERENCE.items() if k != "judge_model"},
                    "finetune_args": {"reference_glue": True}, "qa_args": _QA, "imhi_args": _IMHI},
        needs=NEEDS,
        rows=("GPT-3.5-turbo", "GPT-3.5-turbo + MentalArena (iter 2)"),
        notes=(("model", "gpt-3.5-turbo-0125", "METHOD.md §6"),
               ("epochs", "4, 6", "METHOD.md §1"),
               ("sessions per patient", "16", "inferred: the reference's GPT iteration-1 outputs are 7 files of "
                "4.43 M characters, about 1,900 records at 2,312 characters a record, 16-18 per patient"),
               *_COMMON_NOTES)),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"--preset must be one of {', '.join(PRESETS)}, not {name!r}")
    return PRESETS[name]


def table2_rows(rows: list[dict], before: str, after: str) -> list[list]:
    """Table 2's layout: one line per iteration (its QA rule-R accuracy and IMHI accuracy per column,
    and their mean), then the paper's two lines for this run. `rows`: iterate.py's summary rows."""
    def mean(values):
        present = [v for v in values if v is not None]
        return round(sum(present) / len(present), 2) if len(present) == len(values) else None

    lines = []
    for r in rows:
        cells = [r["qa_reference"].get(c) for c in QA_COLUMNS] + [_imhi_cell(r, c) for c in IMHI_COLUMNS]
        lines.append([f"iteration {r['iteration']}" + (" (start)" if r["iteration"] == 0 else ""), *cells, mean(cells)])
    for model in (before, after):
        values = list(TABLE2[model])
        lines.append([f"paper: {model}", *values, mean(values)])
    return lines


def _imhi_cell(row: dict, dataset: str) -> float | None:
    """The IMHI accuracy of `dataset` in a summary row (its set is "<test set>/<dataset>")."""
    found = [v for name, v in row.get("imhi_accuracy", {}).items() if name.rsplit("/", 1)[-1] == dataset]
    return found[0] if found else None
