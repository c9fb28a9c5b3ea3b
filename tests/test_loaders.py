"""eval.py's benchmark loaders on the awkward parts of the real released files: each test writes a few
records in the layout the benchmark ships (field names, value types, folders as released) and converts
them with eval.convert.

    python -m pytest -q tests/test_loaders.py
"""
import csv
import json
from pathlib import Path

from PIL import Image

import eval as E


def png(path, colour="red"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def convert(bench, srcs, images, out):
    """eval.convert -> ({source_id: row}, the summary line), image paths made absolute again."""
    said = []
    rows = E.convert(bench, [str(s) for s in srcs], images, out, log=said.append)
    for r in rows:
        r["image"] = (Path(out).parent / r["image"]).resolve()
    return {r["meta"]["source_id"]: r for r in rows}, said[0]


def colour_of(path):
    """"red", "green" or "blue": the strongest channel (JPEG shifts the exact values)."""
    rgb = Image.open(path).convert("RGB").getpixel((0, 0))
    return ("red", "green", "blue")[rgb.index(max(rgb))]


# ============================================================================ InfoSeek

def infoseek_row(i, **kw):
    return {"data_id": f"val_{i:08d}", "image_id": f"oven_{i:08d}", "question": f"Question {i}?",
            "answer": ["x"], "answer_eval": ["x"], "data_split": "val_unseen_question", **kw}


def test_infoseek_numerical_answer_eval_as_a_bare_dict(tmp_path):
    """infoseek_eval.py reads answer_eval as [{"wikidata", "range"}] or as that dict alone."""
    png(tmp_path / "oven" / "01" / "oven_00000001.jpg")
    src = write_jsonl(tmp_path / "infoseek_val.jsonl", [infoseek_row(
        1, answer=["330"], answer_eval={"wikidata": 330.0, "range": [297.0, 363.0]})])
    rows, _ = convert("infoseek", [src], tmp_path / "oven", tmp_path / "out" / "q.jsonl")
    assert rows["val_00000001"]["answers"] == ["330", "297.0 - 363.0", "330.0"]


def test_infoseek_question_types_come_from_the_qtype_file_beside_it(tmp_path):
    """The release keeps question_type out of infoseek_val.jsonl, in infoseek_val_qtype.jsonl."""
    png(tmp_path / "oven" / "oven_00000001.jpg")
    src = write_jsonl(tmp_path / "infoseek_val.jsonl", [infoseek_row(1)])
    write_jsonl(tmp_path / "infoseek_val_qtype.jsonl", [{"data_id": "val_00000001", "question_type": "Numerical"}])
    rows, _ = convert("infoseek", [src], tmp_path / "oven", tmp_path / "q.jsonl")
    assert rows["val_00000001"]["meta"]["question_type"] == "Numerical"


# ============================================================================ Encyclopedic-VQA

def test_evqa_inaturalist_ids_map_through_the_inat_annotations(tmp_path):
    """E-VQA names iNaturalist images by iNat's numeric image id; iNat 2021 stores them by UUID, listed in
    its val.json {"images": [{"id", "file_name"}]}."""
    uuid_file = "val/03938_Plantae_Tracheophyta/0b8f2c1e-4d1a-4f5e-9a51-2a7d7c1f0e11.jpg"
    png(tmp_path / "inat" / uuid_file)
    (tmp_path / "val.json").write_text(json.dumps({"images": [{"id": 2686843, "file_name": uuid_file,
                                                               "width": 8, "height": 8}]}))
    src = tmp_path / "test.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer", "dataset_image_ids", "dataset_name",
                                          "question_type", "encyclopedic_vqa_split"])
        w.writeheader()
        w.writerow({"question": "How tall does this plant grow?", "answer": "2 m|two metres",
                    "dataset_image_ids": "2686843|2686844", "dataset_name": "inaturalist",
                    "question_type": "templated", "encyclopedic_vqa_split": "test"})
    rows, _ = convert("evqa", [src, tmp_path / "val.json"], tmp_path / "inat", tmp_path / "q.jsonl")
    assert rows["test-0"]["image"] == (tmp_path / "inat" / uuid_file).resolve()


# ============================================================================ Dyn-VQA (OmniSearch)

URL = "https://example.org/rallm/mm_data/vfreshqa_datasets_v2"


def dyn_row(qid, answer, folder="Freshqa_en_zh/Freshqa_en_extracted_images", name="image_2.jpeg"):
    return {"image_url": f"{URL}/{folder}/{name}", "question": "In what year did humans first land on this planet?",
            "question_id": qid, "answer": answer, "gloden_query": "What year did the first human land on Mars?"}


def test_dynvqa_202410_answer_groups_are_flattened(tmp_path):
    png(tmp_path / "dyn" / "Freshqa_en_zh" / "Freshqa_en_extracted_images" / "image_2.jpeg")
    src = write_jsonl(tmp_path / "DynVQA_en.jsonl", [dyn_row("en2", [["M3系列"], ["M3", "M3 pro", 3]])])
    rows, _ = convert("dynvqa", [src], tmp_path / "dyn", tmp_path / "q.jsonl")
    assert rows["en2"]["answers"] == ["M3系列", "M3", "M3 pro", "3"]
    assert rows["en2"]["meta"]["answer_groups"] == [["M3系列"], ["M3", "M3 pro", 3]]


def test_dynvqa_null_answer_is_skipped_and_counted(tmp_path):
    """DynVQA_en.202408.jsonl has "answer": null for 39 questions."""
    png(tmp_path / "dyn" / "image_2.jpeg")
    src = write_jsonl(tmp_path / "DynVQA_en.jsonl", [dyn_row("en1", None), dyn_row("en2", ["2020"])])
    rows, said = convert("dynvqa", [src], tmp_path / "dyn", tmp_path / "q.jsonl")
    assert set(rows) == {"en2"} and ", 1 without answers," in said


def test_dynvqa_same_file_name_in_two_folders_follows_the_url(tmp_path):
    """The releases hold image_1.jpeg in Timeqa/Timeqaextracted_images/ and in
    Freshqa_en_zh/Freshqa_en_extracted_images/ (and two more folders): different pictures."""
    png(tmp_path / "dyn" / "Timeqa" / "Timeqaextracted_images" / "image_1.jpeg", "blue")
    png(tmp_path / "dyn" / "Freshqa_en_zh" / "Freshqa_en_extracted_images" / "image_1.jpeg", "green")
    src = write_jsonl(tmp_path / "DynVQA_en.jsonl", [
        dyn_row("en1", ["a"], folder="Freshqa_en_zh/Freshqa_en_extracted_images", name="image_1.jpeg"),
        dyn_row("en9", ["b"], folder="Timeqa/Timeqaextracted_images", name="image_1.jpeg")])
    rows, _ = convert("dynvqa", [src], tmp_path / "dyn", tmp_path / "q.jsonl")
    assert colour_of(rows["en1"]["image"]) == "green" and colour_of(rows["en9"]["image"]) == "blue"


def test_dynvqa_dated_releases_keep_their_questions_apart(tmp_path):
    """DynVQA_en.202406.jsonl and DynVQA_en.202410.jsonl reuse question_id en2 (answers change over time)."""
    png(tmp_path / "dyn" / "image_2.jpeg")
    old = write_jsonl(tmp_path / "DynVQA_en.202406.jsonl", [dyn_row("en2", ["never"])])
    new = write_jsonl(tmp_path / "DynVQA_en.202410.jsonl", [dyn_row("en2", [["未知"]])])
    rows, _ = convert("dynvqa", [old, new], tmp_path / "dyn", tmp_path / "q.jsonl")
    assert {k: r["answers"] for k, r in rows.items()} == {"202406-en2": ["never"], "202410-en2": ["未知"]}


# ============================================================================ OK-VQA

def test_okvqa_questions_alone_take_the_annotations_of_their_split(tmp_path):
    """The release puts mscoco_train2014_annotations.json beside mscoco_val2014_annotations.json."""
    png(tmp_path / "coco" / "COCO_val2014_000000297147.jpg")
    qf = tmp_path / "OpenEnded_mscoco_val2014_questions.json"
    qf.write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"image_id": 297147, "question": "What sport can you use this for?", "question_id": 2971475}]}))
    answers = [{"answer_id": i + 1, "answer": "racing", "raw_answer": "racing", "answer_confidence": "yes"}
               for i in range(10)]
    for split, qid in (("train2014", 1), ("val2014", 2971475)):
        (tmp_path / f"mscoco_{split}_annotations.json").write_text(json.dumps({"data_subtype": split, "annotations": [
            {"image_id": 297147, "question_id": qid, "question_type": "one", "answer_type": "other",
             "answers": answers}]}))
    rows, _ = convert("okvqa", [qf], tmp_path / "coco", tmp_path / "q.jsonl")
    assert rows["2971475"]["answers"] == ["racing"]


# ============================================================================ FVQA / MMSearch-R1

def mini_data_row(ground_truth):
    """A row of MMSearch-R1's mmsearch_r1/data/mini_data.pq, exported to JSON: no data_id, no category, no
    <image> in the prompt, image_urls null, candidate_answers a JSON list as text."""
    import base64
    import io
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="JPEG")
    return {"prompt": [{"content": "What is the country of origin of this food?", "role": "user"}],
            "images": [{"bytes": base64.b64encode(buf.getvalue()).decode(), "path": None}],
            "reward_model": {"candidate_answers": '["Kingdom of Spain", "ESP", "ES"]', "ground_truth": ground_truth,
                             "style": "rule"},
            "data_source": "mmsearch_r1/infoseek_train_split", "image_urls": None}


def test_fvqa_rows_without_data_id_get_distinct_ids_per_file(tmp_path):
    a = write_jsonl(tmp_path / "mini_data.jsonl", [mini_data_row("Spain"), mini_data_row("Portugal")])
    b = write_jsonl(tmp_path / "mini_data_2.jsonl", [mini_data_row("France")])
    rows, _ = convert("fvqa", [a, b], None, tmp_path / "out" / "q.jsonl")
    assert {k: r["answers"][0] for k, r in rows.items()} == {
        "mini_data_0": "Spain", "mini_data_1": "Portugal", "mini_data_2_0": "France"}


# ============================================================================ LiveVQA

def test_livevqa_paper_images_with_one_name_per_paper_folder(tmp_path):
    """LiveVQA's Paper/benchmark.json: img_path "2505.00049/x2.png"; 89 papers have an x2.png."""
    png(tmp_path / "Paper" / "Paper_images" / "2505.00049" / "x2.png", "blue")
    png(tmp_path / "Paper" / "Paper_images" / "2505.00050" / "x2.png", "green")
    qa = {"question": "What is the full title of this paper?", "options": ["A. x", "B. y"], "Ground_Truth": "A"}
    src = tmp_path / "Paper" / "benchmark.json"
    src.write_text(json.dumps([
        {"id": paper, "img_path": f"{paper}/x2.png", "source": "Arxiv", "time": "2025-05",
         "level1_qa": dict(qa, Ground_Truth_List=[f"Title {paper}"], img_path=f"{paper}/x2.png"),
         "level2_qa": dict(qa, Ground_Truth_List=["6"], img_path=f"{paper}/x2.png",
                           question_type="generated_hard_inferential")}
        for paper in ("2505.00049", "2505.00050")]))
    rows, _ = convert("livevqa", [src], tmp_path / "Paper", tmp_path / "q.jsonl")
    assert colour_of(rows["2505.00049-level1"]["image"]) == "blue"
    assert colour_of(rows["2505.00050-level1"]["image"]) == "green"
