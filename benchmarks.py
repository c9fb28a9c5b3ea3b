"""benchmarks.py: convert the paper's eight benchmarks, downloaded, into the design's question JSONL.

    python benchmarks.py --bench infoseek --src infoseek_val.jsonl --images oven_images/ --out bench/infoseek.jsonl
    python benchmarks.py --help                     # every benchmark's expected layout
    python eval.py --questions bench/infoseek.jsonl # then evaluate on it

One row function per benchmark (LOADERS) turns a source record (JSONL, JSON, CSV, Parquet) into a question row,
its image found by file name under --images or written out. A record that cannot be read is skipped, counted and
named; a row without an image file or without answers is skipped and counted.
"""
import argparse
import ast
import base64
import csv
import io
import json
import os
import re
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image, UnidentifiedImageError

import tools

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def read_records(path):
    """Rows of a .jsonl, .json, .csv or .parquet file."""
    path, suffix = Path(path), Path(path).suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    if suffix == ".jsonl":
        return tools.read_jsonl(path)
    if suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix not in (".parquet", ".pq"):  # MMSearch-R1 ships mini_data.pq
        raise ValueError(f"{path}: unknown file type {suffix!r} (expected .jsonl, .json, .csv or .parquet / .pq)")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                         "or export the rows to .jsonl first") from None
    return pq.read_table(path).to_pylist()


def _rows(obj):
    """The list of rows in a loaded file: the file itself, or its first list under a usual key."""
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("data", "rows", "items", "questions", "annotations")
                    if isinstance(obj.get(k), list)), None)
    if not isinstance(obj, list):
        raise ValueError("expected a list of rows (or a JSON object holding one)")
    return obj


def _text(x):
    """x as UTF-8-writable text: surrogate pairs (from a Python-literal parser) joined, lone ones replaced."""
    return str(x).encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _listify(x):
    """A gold field as a flat list of aliases: lists (nested ones flattened), '[...]' strings, scalars."""
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [a for v in x for a in (_listify(v) if isinstance(v, (list, tuple)) else [v])]
    if isinstance(x, str) and x.strip()[:1] == "[" and x.strip()[-1:] == "]":
        for parse in (json.loads, ast.literal_eval):  # JSON first: it joins surrogate pairs
            try:
                if isinstance(v := parse(x.strip()), (list, tuple)):
                    return _listify(list(v))
            except (ValueError, SyntaxError):
                pass
    return [x.strip() if isinstance(x, str) else x]


def _by_count(answers):
    """Annotator answers, most frequent first, and their counts."""
    counts = Counter(" ".join(str(a).split()) for a in answers if str(a).strip())
    return [a for a, _ in counts.most_common()], dict(counts)


class Images:
    """A benchmark's image files under root, found by file name, relative path or bare id in any sub-folder (of
    files sharing a name, the one whose folders best match the name's: Dyn-VQA has four image_1.jpeg); images
    embedded in rows go to save_dir."""

    def __init__(self, root=None, save_dir=None):
        self.root, self.save_dir = Path(root) if root else None, Path(save_dir) if save_dir else None
        self.index = None  # file name and stem -> every file so named, built at the first find

    def find(self, *names):
        """The first name that resolves to an image file, or None."""
        if self.index is None:
            self.index = {}
            if self.root is not None and not self.root.is_dir():
                raise FileNotFoundError(f"--images {self.root}: not a folder")
            for dirpath, dirnames, files in os.walk(self.root) if self.root else ():
                dirnames.sort()  # the same first match on every machine
                for p in (Path(dirpath) / f for f in sorted(files)):
                    if p.suffix.lower() in IMAGE_EXTS:
                        for key in {p.name.lower(), p.stem.lower()}:
                            self.index.setdefault(key, []).append(p)
        for n in names:
            n = "" if n is None else str(n).strip()
            if n.startswith(("http://", "https://")):
                n = urlparse(n).path.lstrip("/")
            if n and self.root is not None and (self.root / n).is_file():
                return (self.root / n).resolve()
            if n and (paths := self.index.get(Path(n).name.lower()) or self.index.get(Path(n).stem.lower())):
                want = [s.lower() for s in reversed(Path(n).parts[:-1])]
                return max(paths, key=lambda p: len(os.path.commonprefix(  # max keeps the first of equals
                    [want, [s.lower() for s in reversed(p.relative_to(self.root).parts[:-1])]]))).resolve()
        return None

    def save(self, key, data):
        """Write image bytes as save_dir/<key>.<format>; None if the bytes are not an image."""
        try:
            fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
        except (UnidentifiedImageError, OSError, ValueError):
            return None
        if self.save_dir is None:
            raise ValueError("embedded image bytes need a save_dir")
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(key))}.{'jpg' if fmt == 'jpeg' else fmt}"
        path.write_bytes(data)
        return path.resolve()

    def resolve(self, key, value):
        """An image field (file name, URL, path, bytes, {'bytes','path'}, base64, a list of those) -> a path or None."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return next((p for p in (self.resolve(key, v) for v in value) if p is not None), None)
        if isinstance(value, dict):
            return self.resolve(key, value["bytes"]) if value.get("bytes") else self.find(value.get("path"))
        if isinstance(value, (bytes, bytearray)):
            return self.save(key, bytes(value))
        s = str(value).strip()
        s = s.split(",", 1)[1] if s.startswith("data:image/") and "," in s else s
        if len(s) >= 64 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", s):  # base64 image bytes, or a long id
            try:
                if (path := self.save(key, base64.b64decode(s))) is not None:
                    return path
            except ValueError:
                pass
        return self.find(s)


def make_row(bench, source_id, question, answers, image, missing=None, needs_search=True, **meta):
    """One question row (aliases deduplicated ignoring case); image: an absolute path or None (missing names it)."""
    meta = {"bench": bench, "source_id": str(source_id), **{k: v for k, v in meta.items() if v is not None}}
    if image is None and missing:
        meta["missing_image"] = str(missing)[:100]
    aliases = {}
    for s in (" ".join(_text(a).split()) for a in answers if a is not None):
        if s:
            aliases.setdefault(s.lower(), s)
    return {"id": f"{bench}-{source_id}", "image": image, "question": " ".join(_text(question).split()),
            "answers": list(aliases.values()), "needs_search": bool(needs_search), "meta": meta}


# ----------------------------------------------------------------------------- the eight benchmarks
# A row function per benchmark: (record, its number, source file, Images, ctx) -> a row or a list of rows; its
# docstring is the layout --help shows. A reader, where the sources need one, fills ctx.

def infoseek_row(r, i, src, images, ctx):
    """InfoSeek (Chen et al., 2023). --src: infoseek_{val,test,human}.jsonl, {"data_id", "image_id", "question",
    "answer": [aliases], "answer_eval": [aliases, or {"wikidata": 1.0, "range": [0.9, 1.1]}, alone or in a list:
    the alias "0.9 - 1.1"], "data_split"}; question types from infoseek_val_qtype.jsonl {"data_id",
    "question_type"} beside it. --images: the OVEN images, <image_id>.jpg in any sub-folder."""
    if src not in ctx:
        qtypes = Path(src).with_name(f"{Path(src).stem}_qtype.jsonl")
        ctx[src] = {q["data_id"]: q.get("question_type") for q in (read_records(qtypes) if qtypes.is_file() else [])
                    if isinstance(q, dict) and "data_id" in q}
    answers = _listify(r.get("answer"))
    for a in _listify(r.get("answer_eval")):
        if not isinstance(a, dict):
            answers.append(a)
            continue
        if isinstance(a.get("range"), (list, tuple)) and len(a["range"]) == 2:
            answers.append(f"{a['range'][0]} - {a['range'][1]}")
        answers += [a["wikidata"]] if a.get("wikidata") is not None else []
    return make_row("infoseek", r["data_id"], r["question"], answers, images.find(r.get("image_id")),
                    missing=r.get("image_id"), image_id=r.get("image_id"), data_split=r.get("data_split"),
                    question_type=r.get("question_type") or ctx[src].get(r["data_id"]))


def evqa_read(srcs, inat):
    """The .csv sources' rows; into inat, iNaturalist image id -> file name from the .json sources."""
    for path in [s for s in srcs if Path(s).suffix.lower() == ".json"]:
        data = read_records(path)
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            data = {im["id"]: im["file_name"] for im in data["images"] if "id" in im and "file_name" in im}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected iNaturalist's {{\"images\": [...]}} or {{id: file_name}}")
        inat.update({str(k): str(v) for k, v in data.items()})
    return ((s, _rows(read_records(s))) for s in srcs if Path(s).suffix.lower() != ".json")


def evqa_row(r, i, src, images, inat):
    """Encyclopedic-VQA (Mensink et al., 2023). --src: {train,val,test}.csv: question, answer ('|' between aliases,
    '&&' between a multi_answer's parts), dataset_image_ids ('|'), dataset_name, question_type, wikipedia_url,
    encyclopedic_vqa_split; and iNaturalist 2021's val.json / train.json {"images": [{"id", "file_name"}]} (or an
    {id: file_name} JSON) to map the csv's ids to iNat's UUID file names. --images: Google Landmarks v2
    (a/b/c/<id>.jpg) and iNaturalist 2021; a question gets its first image found."""
    aliases, parts = [a.strip() for a in str(r.get("answer", "")).split("|")], None
    if r.get("question_type") == "multi_answer":
        parts = [[p.strip() for p in a.split("&&") if p.strip()] for a in aliases]
        aliases = [", ".join(p) for p in parts]
    ids = [x.strip() for x in re.split(r"[|,;\s]+", str(r.get("dataset_image_ids", ""))) if x.strip()]
    image = images.find(*(inat.get(x, x) for x in ids))
    return make_row("evqa", f"{r.get('encyclopedic_vqa_split') or Path(src).stem}-{i}", r["question"], aliases,
                    image, missing=ids[0] if ids else None, question_type=r.get("question_type"),
                    dataset_name=r.get("dataset_name"), wikipedia_url=r.get("wikipedia_url"), image_ids=ids,
                    answer_parts=parts)


def simplevqa_row(r, i, src, images, ctx):
    """SimpleVQA (Cheng et al., 2025). --src: the release's JSON / JSONL / parquet, fields data_id, image (a
    file name or URL under --images, or the image itself, base64 or bytes, written next to --out), question,
    answer, language, vqa_category, original_category, source, atomic_question."""
    qid = r.get("data_id", i)
    image = images.resolve(f"simplevqa-{qid}", r.get("image") or r.get("image_path"))
    return make_row("simplevqa", qid, r["question"], _listify(r.get("answer")), image,
                    missing=r.get("image") if isinstance(r.get("image"), str) else None,
                    **{k: r.get(k) for k in ("language", "vqa_category", "original_category", "source",
                                             "atomic_question")})


def dynvqa_row(r, i, src, images, ctx):
    """Dyn-VQA (Li et al., 2024). --src: DynVQA_{en,zh}.jsonl or dated releases DynVQA_en.202406.jsonl ... (the
    date joins the id), {"image_url", "question", "question_id", "answer" (aliases, numbers, null, or 202410's alias
    groups, flattened), "gloden_query" (sic)}. --images: in the folders of the URLs' paths (names repeat)."""
    qid, answer = r.get("question_id"), r.get("answer")
    release = re.search(r"\.(\d{6})$", Path(src).stem)
    url = r.get("image_url") or r.get("image")
    groups = [_listify(g) for g in answer if isinstance(g, list)] if isinstance(answer, list) else []
    return make_row("dynvqa", f"{release[1]}-{qid}" if release else qid, r["question"], _listify(answer),
                    images.find(url), missing=url, image_url=r.get("image_url"),
                    golden_query=r.get("gloden_query") or r.get("golden_query"),
                    language="zh" if str(qid).startswith("zh") else "en",
                    release=release[1] if release else None, answer_groups=groups or None)


def okvqa_read(srcs, ctx):
    """The questions, their annotations in ctx: the given file, or the *annotations*.json of their split beside them."""
    loaded = [read_records(s) for s in srcs]
    qfile = next((d for d in loaded if isinstance(d, dict) and "questions" in d), None)
    afile = next((d for d in loaded if isinstance(d, dict) and "annotations" in d), None)
    if len(loaded) == 1 and qfile is not None and afile is None:
        found, sub = sorted(Path(srcs[0]).parent.glob("*annotations*.json")), qfile.get("data_subtype")
        sibling = next((f for f in found if sub and sub in f.name), found[0] if found else None)
        afile = read_records(sibling) if sibling else None
    if qfile is None or afile is None:
        raise ValueError("okvqa needs the questions JSON and the annotations JSON (give both as --src)")
    ctx["subtype"] = qfile.get("data_subtype") or afile.get("data_subtype") or "val2014"
    ctx["annotations"] = {a["question_id"]: a for a in afile["annotations"]}
    return [(srcs[0], qfile["questions"])]


def okvqa_row(q, i, src, images, ctx):
    """OK-VQA (Marino et al., 2019). --src: OpenEnded_mscoco_val2014_questions.json {"data_subtype", "questions":
    [{"image_id", "question", "question_id"}]} and mscoco_val2014_annotations.json {"annotations": [{"question_id",
    "answers": [{"answer"}] x10, "question_type", "answer_type"}]} (or the questions alone, the annotations beside
    them); aliases most frequent first. --images: COCO val2014, COCO_val2014_<image_id, 12 digits>.jpg."""
    a = ctx["annotations"].get(q["question_id"], {})
    answers, counts = _by_count(x.get("answer") for x in a.get("answers", []))
    iid, sub = int(q["image_id"]), ctx["subtype"]
    return make_row("okvqa", q["question_id"], q["question"], answers,
                    images.find(f"COCO_{sub}_{iid:012d}", f"{iid:012d}", str(iid)),
                    missing=f"COCO_{sub}_{iid:012d}.jpg", image_id=iid, answer_counts=counts,
                    question_type=a.get("question_type"), answer_type=a.get("answer_type"))


def aokvqa_row(r, i, src, images, ctx):
    """A-OKVQA (Schwenk et al., 2022). --src: aokvqa_v1p0_val.json, a list of {"split", "image_id", "question_id",
    "question", "choices", "correct_choice_idx", "direct_answers": [10], ...}; aliases: the direct answers, most
    frequent first, then the correct choice. --images: COCO 2017, <image_id, 12 digits>.jpg."""
    answers, counts = _by_count(r.get("direct_answers") or [])
    choices, idx = r.get("choices") or [], r.get("correct_choice_idx")
    if isinstance(idx, int) and 0 <= idx < len(choices) and answers:
        answers.append(choices[idx])
    iid = int(r["image_id"])
    return make_row("aokvqa", r["question_id"], r["question"], answers,
                    images.find(f"{iid:012d}", f"COCO_val2014_{iid:012d}", str(iid)), missing=f"{iid:012d}.jpg",
                    image_id=iid, split=r.get("split"), answer_counts=counts, choices=choices or None,
                    correct_choice_idx=idx, difficult_direct_answer=r.get("difficult_direct_answer"))


def mmsearch_r1_row(bench, r, qid, images):
    """A row of MMSearch-R1's veRL parquet (see fvqa_row); qid when it has no data_id."""
    rm = r.get("reward_model") or {}
    if isinstance(rm, str):
        try:
            rm = ast.literal_eval(rm)
        except (ValueError, SyntaxError):
            rm = {"ground_truth": rm}
    answers = _listify(rm.get("ground_truth")) + _listify(rm.get("candidate_answers"))
    qid = r["data_id"] if r.get("data_id") is not None else qid
    question = r.get("question")
    if not question:  # the last user message of the prompt: text, chat messages, or OpenAI-style content parts
        prompt = r.get("prompt", "")
        if not isinstance(prompt, str):
            msgs = _listify(prompt)
            user = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"] or msgs
            prompt = user[-1].get("content", "") if user and isinstance(user[-1], dict) else ""
            prompt = " ".join(p.get("text", "") for p in prompt if isinstance(p, dict)) \
                if isinstance(prompt, list) else str(prompt)
        question = re.sub(r"<image>", " ", prompt).strip()
    image = images.resolve(f"{bench}-{qid}", r.get("images") if r.get("images") is not None else r.get("image"))
    return make_row(bench, qid, question, answers, image,
                    missing=r.get("image_urls") if isinstance(r.get("image_urls"), str) else None,
                    needs_search=r.get("category") != "search_free", category=r.get("category"),
                    data_source=r.get("data_source"))


def fvqa_row(r, i, src, images, ctx):
    """FVQA (MMSearch-R1, Wu et al., 2025). --src: fvqa_test.parquet (needs pyarrow) or its rows as JSON / JSONL,
    {"data_id", "prompt": [{"role": "user", "content"}], "images": [{"bytes", "path"}], "reward_model":
    {"ground_truth", "candidate_answers"}, "category", "data_source"}; without data_id (mini_data.pq) the id is
    <file name>_<row>. Embedded images are written next to --out, path-only ones looked up under --images."""
    return mmsearch_r1_row("fvqa", r, f"{Path(src).stem}_{i}", images)


def livevqa_row(r, i, src, images, ctx):
    """LiveVQA (Fu et al., 2025). --src: MMSearch-R1's rows (as fvqa), or LiveVQA's benchmark.json, a list of
    {"id", "img_path", "level1_qa": {"question", "Ground_Truth_List", ...}, "level2_qa", "source", "time"}
    (a question per level), or rows {"sample_id", "query", "gt_answer", "image"}. --images: the LiveVQA images
    (News/News_imgs/, Video/Video_images/, Paper/Paper_images/<arxiv id>/x1.png: img_path's folder counts)."""
    if "reward_model" in r or "prompt" in r:
        return mmsearch_r1_row("livevqa", r, f"{Path(src).stem}_{i}", images)
    if "level1_qa" in r:
        return [make_row("livevqa", f"{r['id']}-{level[:6]}", qa["question"],
                         _listify(qa.get("Ground_Truth_List") or qa.get("Ground_Truth")),
                         images.find(img := qa.get("img_path") or r.get("img_path")), missing=img, level=level[:6],
                         question_type=qa.get("question_type"), source=r.get("source"), time=r.get("time"))
                for level in ("level1_qa", "level2_qa") if (qa := r.get(level))]
    qid, img = r.get("sample_id", r.get("id", i)), r.get("image") or r.get("img_path") or r.get("image_path")
    return make_row("livevqa", qid, r.get("query") or r["question"], _listify(r.get("gt_answer") or r.get("answer")),
                    images.resolve(f"livevqa-{qid}", img), missing=img if isinstance(img, str) else None)


LOADERS = {"infoseek": (infoseek_row, None), "evqa": (evqa_row, evqa_read), "simplevqa": (simplevqa_row, None),
           "dynvqa": (dynvqa_row, None), "okvqa": (okvqa_row, okvqa_read), "aokvqa": (aokvqa_row, None),
           "fvqa": (fvqa_row, None), "livevqa": (livevqa_row, None)}  # name -> (row function, reader)


def load(bench, srcs, images):
    """Rows of bench's source files; a record its row function fails on becomes a {"skipped": why} marker."""
    row, read = LOADERS[bench]
    ctx, rows = {}, []
    for src, records in (read(srcs, ctx) if read else ((s, _rows(read_records(s))) for s in srcs)):
        for i, r in enumerate(records):
            try:
                got = row(r, i, src, images, ctx)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                got = {"skipped": f"{src}: record {i + 1}: {type(e).__name__}: {str(e)[:100]}"}
            rows += got if isinstance(got, list) else [got]
    return rows


def load_infoseek(srcs, images):  # make_real_data.py reads InfoSeek sources with it
    return load("infoseek", srcs, images)


def convert(bench, srcs, images_dir, out, limit=0, log=print):
    """Benchmark files -> question JSONL at out (image paths relative to it; embedded images written to
    <out folder>/images/<bench>/). Returns the rows written."""
    out = Path(out)
    kept, no_image, no_answer, bad = [], [], 0, []
    for r in load(bench, [Path(s) for s in srcs], Images(images_dir, out.parent / "images" / bench)):
        if "skipped" in r:
            bad.append(r["skipped"])
        elif not r["answers"]:
            no_answer += 1
        elif r["image"] is None:
            no_image.append(r["meta"].get("missing_image", r["id"]))
        else:
            kept.append(dict(r, image=Path(os.path.relpath(r["image"], out.parent.resolve())).as_posix()))
    kept = kept[:limit] if limit else kept
    out.parent.mkdir(parents=True, exist_ok=True)
    tools.write_jsonl(out, kept)
    log(f"{bench}: wrote {len(kept)} questions to {out}; skipped {len(no_image)} without an image file"
        + (f" (e.g. {', '.join(map(str, no_image[:3]))})" if no_image else "")
        + f", {no_answer} without answers, {len(bad)} malformed" + (f" ({'; '.join(bad[:3])})" if bad else ""))
    return kept


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description="Convert a downloaded benchmark into the design's question JSONL.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Expected layouts:\n\n" + "\n\n".join(
            f"{name}: {' '.join(row.__doc__.split())}" for name, (row, _) in LOADERS.items()))
    p.add_argument("--bench", required=True, choices=sorted(LOADERS), help="which benchmark")
    p.add_argument("--src", required=True, nargs="+", help="the benchmark's annotation file(s)")
    p.add_argument("--images", help="folder holding the benchmark's images (searched recursively by file name)")
    p.add_argument("--out", required=True, help="question JSONL to write")
    p.add_argument("--limit", type=int, default=0, help="keep the first N questions (0: all)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        return convert(args.bench, args.src, args.images, args.out, limit=args.limit)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"benchmarks.py {args.bench}: {type(e).__name__}: {e}") from None


if __name__ == "__main__":
    main()
