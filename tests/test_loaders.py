"""eval.py's benchmark loaders: for each of the eight, a small hand-written sample of its format, and the
awkward parts of the real released files (field names, value types, folders as released), converted with
`benchmarks.py` and read back as every script reads a question file.

    python -m pytest -q tests/test_loaders.py
"""
import base64
import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

import benchmarks as B
import eval as E
import tools as T


def png(path, colour="red"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def png_bytes(colour="blue"):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def convert(bench, srcs, images, out):
    """`benchmarks.py`, then the file read back as every script reads it (tools.load_questions) ->
    ({source_id: row}, what it printed). Every row has its benchmark's id and meta and an image file (its
    path resolved here; the file holds it relative to itself)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        B.main(["--bench", bench, "--src", *map(str, srcs), "--out", str(out)]
               + (["--images", str(images)] if images else []))
    rows = T.load_questions(out)
    assert not Path(json.loads(Path(out).read_text().splitlines()[0])["image"]).is_absolute()
    for r in rows:
        r["image"] = Path(r["image"]).resolve()
        assert r["id"].startswith(bench + "-") and r["meta"]["bench"] == bench and r["image"].is_file(), r
    return {r["meta"]["source_id"]: r for r in rows}, printed.getvalue()


def colour_of(path):
    """"red", "green" or "blue": the strongest channel (JPEG shifts the exact values)."""
    rgb = Image.open(path).convert("RGB").getpixel((0, 0))
    return ("red", "green", "blue")[rgb.index(max(rgb))]


# ============================================================================ InfoSeek

def test_load_infoseek(tmp_path):
    imgs = tmp_path / "oven"
    png(imgs / "00" / "oven_00000001.jpg")
    png(imgs / "oven_00000002.JPG")
    src = tmp_path / "infoseek_val.jsonl"
    write_jsonl(src, [
        {"data_id": "val_00000001", "image_id": "oven_00000001", "question": "Which river flows by this?",
         "answer": ["Seine", "Seine River"], "answer_eval": ["Seine", "River Seine"],
         "data_split": "val_unseen_entity"},
        {"data_id": "val_00000002", "image_id": "oven_00000002", "question": "How tall is this tower in metres?",
         "answer": ["330"], "answer_eval": [{"wikidata": 330.0, "range": [297.0, 363.0]}],
         "data_split": "val_unseen_question"},
        {"data_id": "val_00000003", "image_id": "oven_missing", "question": "?", "answer": ["x"],
         "answer_eval": ["x"], "data_split": "val_unseen_question"},
    ])
    rows, _ = convert("infoseek", [src], imgs, tmp_path / "out" / "infoseek.jsonl")
    assert set(rows) == {"val_00000001", "val_00000002"}               # the missing image is skipped
    assert rows["val_00000001"]["answers"] == ["Seine", "Seine River", "River Seine"]
    assert rows["val_00000002"]["meta"]["data_split"] == "val_unseen_question"
    assert E.score("about 320 m", rows["val_00000002"]["answers"]) == 1.0   # inside the range
    assert E.score("400", rows["val_00000002"]["answers"]) == 0.0


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

def test_load_evqa(tmp_path):
    imgs = tmp_path / "inat"
    png(imgs / "train" / "03111_Animalia" / "5d1c1f3a-0000-4e5e-9c1f-aaaaaaaaaaaa.jpg")
    png(imgs / "landmarks" / "a" / "b" / "c" / "abc0123456789def.jpg")
    src = tmp_path / "test.csv"
    cols = ["question", "answer", "dataset_image_ids", "dataset_name", "dataset_category_id", "question_type",
            "wikipedia_url", "wikipedia_title", "encyclopedic_vqa_split"]
    with open(src, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerow({"question": "How long does this animal live?", "answer": "10 years|ten years",
                    "dataset_image_ids": "missing-id|5d1c1f3a-0000-4e5e-9c1f-aaaaaaaaaaaa",
                    "dataset_name": "inaturalist", "dataset_category_id": "3111", "question_type": "templated",
                    "wikipedia_url": "https://en.wikipedia.org/wiki/X", "wikipedia_title": "X",
                    "encyclopedic_vqa_split": "test"})
        w.writerow({"question": "Which materials is this built of?", "answer": "stone&&brick|brick&&stone",
                    "dataset_image_ids": "abc0123456789def", "dataset_name": "landmarks",
                    "dataset_category_id": "7", "question_type": "multi_answer",
                    "wikipedia_url": "https://en.wikipedia.org/wiki/Y", "wikipedia_title": "Y",
                    "encyclopedic_vqa_split": "test"})
    rows, _ = convert("evqa", [src], imgs, tmp_path / "evqa.jsonl")
    assert rows["test-0"]["answers"] == ["10 years", "ten years"]
    assert Path(rows["test-0"]["image"]).stem == "5d1c1f3a-0000-4e5e-9c1f-aaaaaaaaaaaa"  # first id found
    assert rows["test-1"]["answers"] == ["stone, brick", "brick, stone"]
    assert rows["test-1"]["meta"]["answer_parts"] == [["stone", "brick"], ["brick", "stone"]]
    assert rows["test-1"]["meta"]["question_type"] == "multi_answer"


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


# ============================================================================ SimpleVQA

def test_load_simplevqa(tmp_path):
    imgs = tmp_path / "imgs"
    png(imgs / "simplevqa_7.png")
    src = tmp_path / "simplevqa.json"
    src.write_text(json.dumps([
        {"data_id": 7, "image": "simplevqa_7.png", "image_description": "", "language": "EN",
         "question": "Who painted this?", "answer": "Claude Monet", "original_category": "art",
         "source": "web", "atomic_question": "Who painted Water Lilies?", "atomic_fact": "",
         "vqa_category": "art"},
        {"data_id": 8, "image": base64.b64encode(png_bytes()).decode() * 1, "language": "CN",
         "question": "这是哪座城市？", "answer": "上海", "vqa_category": "place"},
    ]))
    rows, _ = convert("simplevqa", [src], imgs, tmp_path / "out" / "simplevqa.jsonl")
    assert rows["7"]["answers"] == ["Claude Monet"] and rows["7"]["meta"]["language"] == "EN"
    assert rows["8"]["answers"] == ["上海"]
    assert Path(rows["8"]["image"]).parent == (tmp_path / "out" / "images" / "simplevqa").resolve()
    assert Image.open(rows["8"]["image"]).size == (20, 20)               # the embedded image, decoded


# ============================================================================ Dyn-VQA (OmniSearch)

def test_load_dynvqa(tmp_path):
    imgs = tmp_path / "dyn"
    png(imgs / "image_125.jpeg")
    src = tmp_path / "DynVQA_en.jsonl"
    write_jsonl(src, [
        {"image_url": "https://example.org/Freshqa_en_extracted_images/image_125.jpeg",
         "question": "How many humans have landed on this planet?", "question_id": "en34",
         "answer": ["目前还没有人类去过火星。", 0, "零", "No humans have been to Mars yet.", 0, "zero", "none"],
         "gloden_query": "How many humans have landed on Mars?"},
    ])
    rows, _ = convert("dynvqa", [src], imgs, tmp_path / "dynvqa.jsonl")
    r = rows["en34"]
    assert "0" in r["answers"] and r["answers"].count("0") == 1 and "zero" in r["answers"]
    assert r["meta"]["golden_query"] == "How many humans have landed on Mars?"
    assert E.score("none", r["answers"]) == 1.0 and E.score("Zero.", r["answers"]) == 1.0


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


# ============================================================================ OK-VQA and A-OKVQA

def test_load_okvqa(tmp_path):
    imgs = tmp_path / "coco" / "val2014"
    png(imgs / "COCO_val2014_000000297147.jpg")
    qf, af = tmp_path / "OpenEnded_mscoco_val2014_questions.json", tmp_path / "mscoco_val2014_annotations.json"
    qf.write_text(json.dumps({"data_subtype": "val2014", "license": {}, "questions": [
        {"image_id": 297147, "question": "What sport can you use this for?", "question_id": 2971475}]}))
    answers = ["racing"] * 4 + ["motocross"] * 4 + ["race", "riding"]
    af.write_text(json.dumps({"data_subtype": "val2014", "annotations": [
        {"image_id": 297147, "question_id": 2971475, "question_type": "one", "answer_type": "other",
         "confidence": 2, "answers": [{"answer_id": i + 1, "answer": a, "raw_answer": a,
                                       "answer_confidence": "yes"} for i, a in enumerate(answers)]}]}))
    rows, _ = convert("okvqa", [qf, af], tmp_path / "coco", tmp_path / "okvqa.jsonl")
    r = rows["2971475"]
    assert r["answers"] == ["racing", "motocross", "race", "riding"]   # most frequent first
    assert r["meta"]["answer_counts"] == {"racing": 4, "motocross": 4, "race": 1, "riding": 1}


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


def test_load_aokvqa(tmp_path):
    imgs = tmp_path / "coco"
    png(imgs / "val2017" / "000000461751.jpg")
    src = tmp_path / "aokvqa_v1p0_val.json"
    src.write_text(json.dumps([
        {"split": "val", "image_id": 461751, "question_id": "22jbM6gDxdaMaunuzgrsBB",
         "question": "What is in the motorcyclist's mouth?", "choices": ["toothpick", "food", "popsicle stick",
                                                                          "cigarette"],
         "correct_choice_idx": 3, "direct_answers": ["cigarette"] * 9 + ["cigar"],
         "difficult_direct_answer": False, "rationales": ["He's smoking while riding."]},
        {"split": "test", "image_id": 461751, "question_id": "no-answers", "question": "?",
         "choices": ["a", "b"], "correct_choice_idx": None, "direct_answers": [],
         "difficult_direct_answer": False, "rationales": []},
    ]))
    rows, _ = convert("aokvqa", [src], imgs, tmp_path / "aokvqa.jsonl")
    assert set(rows) == {"22jbM6gDxdaMaunuzgrsBB"}                     # test rows have no answers
    r = rows["22jbM6gDxdaMaunuzgrsBB"]
    assert r["answers"] == ["cigarette", "cigar"] and r["meta"]["choices"][3] == "cigarette"


# ============================================================================ FVQA / MMSearch-R1

def mmsearch_row(i, category="search_required"):
    return {"data_id": f"fvqa_test_{i}", "data_source": "mmsearch_r1/fvqa_test", "category": category,
            "prompt": [{"role": "user", "content": f"<image>\nWhat is the name of this bridge {i}?"}],
            "images": [{"bytes": base64.b64encode(png_bytes()).decode(), "path": None}],
            "reward_model": {"ground_truth": "Golden Gate Bridge",
                             "candidate_answers": "['Golden Gate', 'GG Bridge']"},
            "image_urls": "https://example.org/bridge.jpg"}


def test_load_fvqa(tmp_path):
    src = tmp_path / "fvqa_test.jsonl"                 # the parquet's rows, exported to JSONL
    write_jsonl(src, [mmsearch_row(0), mmsearch_row(1, "search_free")])
    rows, _ = convert("fvqa", [src], None, tmp_path / "fvqa.jsonl")
    r = rows["fvqa_test_0"]
    assert r["question"] == "What is the name of this bridge 0?"
    assert r["answers"] == ["Golden Gate Bridge", "Golden Gate", "GG Bridge"]
    assert r["needs_search"] is True and rows["fvqa_test_1"]["needs_search"] is False
    # rows as pyarrow's to_pylist gives them: raw bytes, lists, dicts
    raw = dict(mmsearch_row(2), images=[{"bytes": png_bytes(), "path": "x.png"}],
               reward_model={"ground_truth": "Golden Gate Bridge", "candidate_answers": ["Golden Gate"]})
    row = B.mmsearch_r1_row("fvqa", raw, 0, B.Images(None, tmp_path / "saved"))
    assert row["answers"] == ["Golden Gate Bridge", "Golden Gate"] and Path(row["image"]).is_file()


def test_fvqa_with_escaped_emoji_and_a_bad_record_converts_the_rest(tmp_path):
    """MMSearch-R1's mini_data.pq: candidate_answers is a JSON string holding an emoji as a surrogate-
    pair escape; one malformed record is skipped, counted and named, the rest converted."""
    good = dict(mmsearch_row(0), reward_model={"ground_truth": "Golden Gate Bridge",
                                                 "candidate_answers": '["GG \\ud83c\\udf09 Bridge"]'})
    py_literal = dict(mmsearch_row(1), reward_model="{'ground_truth': 'Bay \\ud83c\\udf09', 'candidate_answers': []}")
    bad = dict(mmsearch_row(2), prompt=5, question=None, reward_model=7)
    src = tmp_path / "mini_data.jsonl"
    write_jsonl(src, [good, bad, py_literal])
    rows, said = convert("fvqa", [src], None, tmp_path / "f.jsonl")
    assert rows["fvqa_test_0"]["answers"] == ["Golden Gate Bridge", "GG \U0001f309 Bridge"]
    assert rows["fvqa_test_1"]["answers"] == ["Bay \U0001f309"]
    assert set(rows) == {"fvqa_test_0", "fvqa_test_1"}
    assert f"1 malformed ({src}: record 2: " in said


def test_load_fvqa_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [dict(mmsearch_row(0), images=[{"bytes": png_bytes(), "path": ""}])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mini_data.pq")  # the suffix MMSearch-R1 ships
    assert set(convert("fvqa", [tmp_path / "mini_data.pq"], None, tmp_path / "f.jsonl")[0]) == {"fvqa_test_0"}


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

def test_load_livevqa(tmp_path):
    imgs = tmp_path / "News" / "News_imgs"
    png(imgs / "bbc_6298a2d65d5ba74e817666f9d896b8a2.jpg")
    src = tmp_path / "benchmark.json"
    qa = {"question_type": "person", "options": ["A. X", "B. Y"], "Ground_Truth": "A",
          "img_path": "bbc_6298a2d65d5ba74e817666f9d896b8a2.jpg", "img_url": "https://example.org/i.jpg"}
    src.write_text(json.dumps([{
        "id": "0_20250509205534541488", "img_path": "bbc_6298a2d65d5ba74e817666f9d896b8a2.jpg",
        "level1_qa": dict(qa, question="Based on the provided image, who is the person shown?",
                          Ground_Truth_List=["Oghenochuko Ojiri", "Ochuko Ojiri"]),
        "level2_qa": dict(qa, question="Where is the gallery he founded based?", Ground_Truth_List=["east London"]),
        "source": "BBC UK", "time": "2025-05-09T14:46:31.131Z"}]))
    verl = tmp_path / "livevqa_mmsearch_r1.jsonl"
    write_jsonl(verl, [dict(mmsearch_row(5), data_id="livevqa_5")])
    rows, _ = convert("livevqa", [src, verl], tmp_path / "News", tmp_path / "livevqa.jsonl")
    assert rows["0_20250509205534541488-level1"]["answers"] == ["Oghenochuko Ojiri", "Ochuko Ojiri"]
    assert rows["0_20250509205534541488-level2"]["meta"]["level"] == "level2"
    assert rows["livevqa_5"]["answers"][0] == "Golden Gate Bridge"


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


# ============================================================================ bad input

def test_convert_reports_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        B.main(["--bench", "infoseek", "--src", str(tmp_path / "nope.jsonl"), "--out",
                str(tmp_path / "o.jsonl")])
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(SystemExit, match="unknown file type"):
        B.main(["--bench", "dynvqa", "--src", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o.jsonl")])
