"""The embedded cognition example: 6 images from the sample, 12 expert-style multiple-choice questions, written in
the official layout (``cognition/test/*.json`` with each image beside its JSON) and in the simple table format (``questions.jsonl``).

Each question has six choices A–F with "None of the above" last, like the official cognition split; questions are
built from the sample row's own metadata so a model that perceives the image can answer them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from microbench.data.loading import load_ubench

#: (dataset, scale) of the sample rows used, one image each
PICKS = (("acevedo_et_al_2020", "cellular"), ("kather_et_al_2016", "tissue"), ("nirschl_et_al_2018", "tissue"),
         ("held_et_al_2010_h2b", "cellular"), ("opencell", "subcellular"), ("tang_et_al_2019", "tissue"))
NOTA = "None of the above"


def _options(gold: str, pool: list[str], rng: random.Random) -> tuple[list[str], int]:
    others = [p for p in dict.fromkeys(pool) if p != gold]
    rng.shuffle(others)
    opts = [gold, *others[:4]]
    while len(opts) < 5:
        opts.append(f"none of these {len(opts)}")
    rng.shuffle(opts)
    return [*opts, NOTA], opts.index(gold)


def write_sample_cognition(sample_dir: Path, seed: int = 0) -> list[Path]:
    from datasets import Image

    from microbench.data.questions import build_question_table

    ds, _ = load_ubench(sample_dir)
    rows = build_question_table(ds).rows
    raw = ds.cast_column("image", Image(decode=False))
    rng = random.Random(seed)
    folder = Path(sample_dir) / "cognition"
    (folder / "test").mkdir(parents=True, exist_ok=True)
    table, written = [], []
    modalities = sorted(set(rows["modality"].dropna()))
    for dataset, scale in PICKS:
        sel = rows[rows["dataset"] == dataset]
        row = int(sel["row_idx"].iloc[0])
        rec = ds.select([row]).select_columns(["label_name", "modality", "submodality", "domain", "subdomain",
                                               "stain"])[0]
        labels = sorted(set(sel["label_name"]))
        name = f"{dataset}_{row}.png"
        (folder / "test" / name).write_bytes(raw[row]["image"]["bytes"])  # the official place: beside the JSON
        written.append(folder / "test" / name)
        q1_opts, g1 = _options(rec["label_name"].replace("_", " "), [lab.replace("_", " ") for lab in labels]
                               + ["artifact", "necrosis", "mitochondrion", "apoptotic body"], rng)
        q2_opts, g2 = _options(rec["modality"], modalities + ["electron", "x-ray"], rng)
        questions = {
            "cognition_0": {"question": f"A {rec['stain'] or 'stained'} {rec['submodality'] or 'light'} micrograph "
                                        f"from a {rec['subdomain']} study. Considering the morphology, which finding "
                                        "best describes the main structure shown?",
                            "options": q1_opts, "answer": q1_opts[g1]},
            "cognition_1": {"question": "Based on the contrast mechanism visible in this image, which microscopy "
                                        "modality was most likely used to acquire it?",
                            "options": q2_opts, "answer": q2_opts[g2]},
        }
        meta = {"modality": rec["modality"], "submodality": rec["submodality"], "domain": rec["domain"],
                "subdomain": rec["subdomain"], "scale": scale, "questions": questions}
        record = {"metadata": {"name": name, "width": 96, "height": 96}, "custom_metadata": meta}
        path = folder / "test" / f"{Path(name).stem}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        written.append(path)
        for key, q in questions.items():
            table.append({"id": f"{Path(name).stem}/{key}", "image": f"cognition/test/{name}", "question": q["question"],
                          "options": q["options"], "answer_idx": q["options"].index(q["answer"]),
                          "modality": rec["modality"], "submodality": rec["submodality"], "domain": rec["domain"],
                          "subdomain": rec["subdomain"], "scale": scale})
    jsonl = Path(sample_dir) / "cognition_questions.jsonl"
    jsonl.write_text("".join(json.dumps(t) + "\n" for t in table))
    written.append(jsonl)
    return written
