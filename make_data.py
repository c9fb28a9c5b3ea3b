"""make_data.py: the offline synthetic world that stands in for the web, its teacher trajectories and the
tiny checkpoint.

    python make_data.py                         # default world under data/ (skipped when up to date)
    python make_data.py --force                 # rebuild even if data/summary.json matches the args
    python make_data.py --small --out /tmp/w    # a few dozen entities in seconds (tests, CI)
    python make_data.py --n_entities 2000 --n_sft 8000 --n_eval 500 --seed 1

It writes under --out (paths inside files are relative to it):

    entities.jsonl          {"id","name","category","colour","colour2","mark","image","split","facts","maker"}
    corpus.jsonl            {"id","title","text","url"}: profile, fact and near-miss distractor pages
    image_index.jsonl       {"id","image","title","text","url"}: every entity's icon, on a few pages
    images/*.png            icons e*.png (56x56), scenes <qid>.png (2-4 icons in a row), tool images <qid>_t<k>.png
    questions_train.jsonl   question rows for training-split entities (the SFT ones + the RL ones)
    sft.jsonl               teacher trajectories through search.make_tools(out) with its defaults
    rl.jsonl                RL prompts (question rows)
    questions_eval.jsonl    held-out entities, all five kinds
    questions_hard.jsonl    held-out entities, multi-hop and crop-then-search questions
    tiny/                   the tiny tokenizer + checkpoint (build_tiny) trained on the texts above
    summary.json            the arguments, counts per kind, teacher and replay rates, image-search accuracies

An icon shows its entity's category in the shape and its identity in a colour pair and mark: a held-out
entity is known only through image search, its facts only through text search (one page per "<name>
<relation>"; near-miss names catch a sloppy query). Scenes of 2-4 icons make the teacher crop by a referring
expression ("the third object from the left", "the square") that search.SceneGrounder turns into a box. The
teacher runs the real tools, decides from the last observation (never from the gold answer) and keeps what
reaches gold, each replayed through fresh backends. The split is by entity. The real DeepMMSearchVQA
pipeline is make_real_data.py.
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import time
from collections import Counter
from pathlib import Path

# before numpy loads: OpenBLAS threads make the image index's small mat-vecs ~10x slower on 2 busy cores
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

import model as M  # noqa: E402
import search  # noqa: E402
import tools  # noqa: E402
import training  # noqa: E402

VERSION = 8  # bump when the world changes, so an old data/ is rebuilt rather than skipped

# ----------------------------------------------------------------------------- the world's vocabulary

ICON = 56  # px; the vision tower sees 14 px patches merged 2x2, so an icon is 4 image tokens
BACKGROUND = (236, 236, 236)
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross", "arrow")
COLOURS = {"red": (215, 40, 40), "orange": (245, 140, 20), "yellow": (235, 205, 25), "green": (40, 155, 60),
           "blue": (40, 80, 215), "purple": (135, 50, 180), "pink": (245, 125, 185), "black": (30, 30, 30)}
MARKS = ("dot", "bar", "stripe", "ring", "x", "box", "border")  # in the second colour: "a blue dot"
ORDINALS = ("first", "second", "third", "fourth")
MAX_SLOTS = len(ORDINALS)

# relation -> title key (the words a query adds to the name), the page sentence, question templates
RELATIONS = {
    "founded": {"key": "founding year", "sentence": "{s} was founded in {v}.",
                "questions": ("In what year was {obj} founded?", "When was {obj} founded?")},
    "city": {"key": "home city", "sentence": "{s} is based in {v}.",
             "questions": ("In which city is {obj} based?", "Where is {obj} based?")},
    "maker": {"key": "maker", "sentence": "{s} is made by {v}.",
              "questions": ("Who makes {obj}?", "Who is the maker of {obj}?")}}
NAME_QUESTIONS = ("What is the name of {obj}?", "What is {obj} called?", "Which entity is {obj}?")
HOP_QUESTIONS = {  # multi-hop: a fact of the maker of the object
    "city": ("In which city is the maker of {obj} based?", "Where is the maker of {obj} based?"),
    "founded": ("In what year was the maker of {obj} founded?", "When was the maker of {obj} founded?")}
FREE_QUESTIONS = {  # answerable from the pixels
    "shape": ("What shape is {obj}?", "Which shape is {obj}?"),
    "colour": ("What is the main colour of {obj}?", "What colour is {obj} mostly?")}
IMAGE_INDEX_TEXTS = ("{name} is {a_category}.", "A photo of {name}.", "{name}, {colour} and {colour2}.")

# Templated reasons: after a search the reason names what was found, so the next query is a copy.
R_IDENTIFY = "I need to identify {obj}."
R_FOUND = {"whole": "The image is {name}.", "crop": "The object is {name}."}
R_NEED = " I need its {key}."
R_HOP = "{sentence} Next search: {name} {key}."  # the query, word for word: copied, not composed
R_WRONG = "The result is about {got}, not {want}. I will search the exact name."
R_FREE = {"shape": "I can see the shape of {obj}.", "colour": "I can see the colour of {obj}."}

KINDS = ("search_free", "image", "image_text", "multihop", "crop")
# Question kinds per file. SFT: half search-free, so that the agent learns when not to search.
# RL: GRPO learns only from groups that disagree, and SFT rarely fails one hop: lean to the multi-step kinds.
SFT_MIX = {"search_free": 0.5, "image": 0.075, "image_text": 0.15, "multihop": 0.1, "crop": 0.175}
RL_MIX = {"search_free": 0.15, "image": 0.05, "image_text": 0.2, "multihop": 0.3, "crop": 0.3}
BY_CATEGORY = 0.6  # share of scene objects named by their category ("the square") when it is unique there
FREE_ON_SCENE = 0.25  # share of search-free questions asked about one object of a scene
CROP_WITH_FACT = 0.5  # share of crop questions that need a text search after the crop
URL = "https://synth.local/"
OUTPUTS = ("entities.jsonl", "corpus.jsonl", "image_index.jsonl", "images", "questions_train.jsonl", "sft.jsonl",
           "rl.jsonl", "questions_eval.jsonl", "questions_hard.jsonl", "tiny", "summary.json")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_entities", type=int, default=800)
    p.add_argument("--held_out", type=float, default=0.2, help="share of entities kept for evaluation")
    p.add_argument("--n_distractors", type=int, default=2, help="near-miss names per entity")
    p.add_argument("--n_sft", type=int, default=4000, help="SFT questions (50:50 search-required:search-free)")
    p.add_argument("--n_rl", type=int, default=1000, help="RL prompts")
    p.add_argument("--n_eval", type=int, default=300, help="questions in each eval set")
    p.add_argument("--self_correct", type=float, default=0.2, help="share of SFT text searches that first miss")
    # small on purpose: with 4096, whole names become tokens (18% of held-out names' tokens unseen in SFT)
    p.add_argument("--vocab_size", type=int, default=1536, help="tiny BPE vocabulary (every name word one token)")
    p.add_argument("--copy_steps", type=int, default=2000, help="tiny model's copy warm-up steps (0: none)")
    p.add_argument("--caption_steps", type=int, default=1000, help="tiny model's caption warm-up steps (0: none)")
    p.add_argument("--hidden", type=int, default=128, help="tiny model width")
    p.add_argument("--layers", type=int, default=4, help="tiny model decoder layers")
    p.add_argument("--heads", type=int, default=4, help="tiny model attention heads")
    p.add_argument("--no_tiny", action="store_true", help="skip the tiny tokenizer/checkpoint")
    p.add_argument("--small", action="store_true", help="a few dozen entities (tests, CI)")
    p.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.small:
        args.n_entities, args.n_sft, args.n_rl, args.n_eval = 40, 160, 40, 40
        args.copy_steps = args.caption_steps = 0
    return args


def build_key(args):
    """What the output depends on: equal keys mean identical files."""
    skip = {"out", "force", "quiet", "small"}
    return {"version": VERSION, **{k: v for k, v in sorted(vars(args).items()) if k not in skip}}


# ----------------------------------------------------------------------------- entities

def template_words():
    """Every word our templates use: a generated name must never be one of them (BM25 would match it)."""
    texts = [R_IDENTIFY, R_NEED, R_HOP, R_WRONG, *R_FOUND.values(), *R_FREE.values(), *NAME_QUESTIONS,
             *IMAGE_INDEX_TEXTS, *SHAPES, *COLOURS, *MARKS, *ORDINALS, "object from the left with",
             *(q for qs in HOP_QUESTIONS.values() for q in qs), *(q for qs in FREE_QUESTIONS.values() for q in qs)]
    for r in RELATIONS.values():
        texts += [r["key"], r["sentence"], *r["questions"]]
    return {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}


ONSETS = list("bdfgklmnprstvz") + ["br", "dr", "kr", "st", "tr", "th", "sh"]
MIDDLES = list("bdfgklmnprstvz") + ["ss", "rr", "ll", "nd", "rv"]
CODAS = list("nrlsktm") + ["ss", "rk", "nd", "th"]
VOWELS = list("aeiou")
CITY_ENDS = ("ton", "vale", "holm", "ford", "mouth", "wick")


def make_word(rng):
    return (rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(MIDDLES) + rng.choice(VOWELS)
            + rng.choice(CODAS)).capitalize()


def fresh(rng, used, make):
    """A word from make(rng) not in `used` (which it joins)."""
    while (w := make(rng)).lower() in used:
        pass
    used.add(w.lower())
    return w


def make_entities(n, held_out, seed):
    """n entities: unique two-word names and looks, facts, a split; makers from the same split."""
    rng = random.Random(f"{seed}-entities")
    used = template_words()
    looks = [(s, c, c2, m) for s in SHAPES for c in COLOURS for c2 in COLOURS if c2 != c for m in MARKS]
    if n > len(looks):
        raise ValueError(f"at most {len(looks)} distinct looks; asked for {n} entities")
    looks = rng.sample(looks, n)
    cities = [fresh(rng, used, lambda r: make_word(r)[:-1] + r.choice(CITY_ENDS)) for _ in range(max(8, n // 20))]
    # Names pair words of two small pools (each word recurs: one token); a held-out name is a new pair...
    pool = 2 * math.isqrt(3 * n) + 8  # pool^2 >= 12 n pairs: room for entities and their distractors
    firsts = [fresh(rng, used, make_word) for _ in range(pool)]
    lasts = [fresh(rng, used, make_word) for _ in range(pool)]
    n_held = max(MAX_SLOTS, round(n * held_out))
    pairs = [(f, la) for f in firsts for la in lasts]
    rng.shuffle(pairs)
    train_pairs = pairs[:n - n_held]
    # ...of words training names use (an unseen word is an untrained token, measured copied wrong every time)
    seen = {w for p in train_pairs for w in p}
    pairs = [p for p in pairs[n - n_held:] if set(p) <= seen][:n_held] + train_pairs
    if len(pairs) < n:
        raise ValueError(f"{n} entities: too few names for the held-out share {held_out}")
    ents = [{"id": f"e{i:04d}", "name": " ".join(pairs[i]), "category": shape, "colour": colour, "colour2": colour2,
             "mark": mark, "image": f"images/e{i:04d}.png", "split": "heldout" if i < n_held else "train",
             "facts": {"founded": str(rng.randint(1800, 2019)), "city": rng.choice(cities)}}
            for i, (shape, colour, colour2, mark) in enumerate(looks)]
    for split in ("train", "heldout"):
        group = [e for e in ents if e["split"] == split]
        for e in group:
            maker = rng.choice([o for o in group if o is not e])
            e["maker"], e["facts"]["maker"] = maker["id"], maker["name"]
    return ents, cities, (firsts, lasts)


def make_distractors(ents, cities, pools, k, seed):
    """k near-miss names per entity (one word swapped, a name no entity has), with random facts."""
    rng = random.Random(f"{seed}-distractors")
    taken, train, out = {e["name"] for e in ents}, [e for e in ents if e["split"] == "train"], []
    for e in ents:
        first, last = e["name"].split()
        for j in range(k):
            while True:
                name = f"{first} {rng.choice(pools[1])}" if j % 2 == 0 else f"{rng.choice(pools[0])} {last}"
                if name not in taken:
                    taken.add(name)
                    break
            out.append({"id": f"{e['id']}d{j}", "of": e["id"], "name": name, "category": rng.choice(SHAPES),
                        "colour": rng.choice(list(COLOURS)), "colour2": rng.choice(list(COLOURS)),
                        "mark": rng.choice(MARKS), "facts": {
                            "founded": str(rng.randint(1800, 2019)), "city": rng.choice(cities),
                            "maker": rng.choice(ents if e["split"] == "heldout" else train)["name"]}})
    return out


# ----------------------------------------------------------------------------- corpus and image index

def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def fact_title(name, relation):
    return f"{name} {RELATIONS[relation]['key']}"


def fact_sentence(name, relation, value):
    return RELATIONS[relation]["sentence"].format(s=name, v=value)


def a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def look(e):
    return f"{a(e['colour'])} {e['category']} with {a(e['colour2'] + ' ' + e['mark'])}"


def make_corpus(ents, distractors, seed):
    """Every entity's and distractor's web pages: a profile and one page per fact."""
    rows = []
    for e in ents + distractors:
        base = URL + slug(e["name"])
        rows.append({"id": f"p-{e['id']}", "title": e["name"], "text": f"{e['name']} is {look(e)}.", "url": base})
        rows += [{"id": f"f-{e['id']}-{rel}", "title": fact_title(e["name"], rel),
                  "text": fact_sentence(e["name"], rel, value), "url": f"{base}/{slug(RELATIONS[rel]['key'])}"}
                 for rel, value in e["facts"].items()]
    random.Random(f"{seed}-corpus").shuffle(rows)  # so that no ranking tie is broken in the right page's favour
    return rows


def make_image_index(ents):
    """Every icon on 3 pages, Tools' default topk: an exact match fills the results with one entity,
    so no held-out name shows up in a training trajectory's image-search results."""
    return [{"id": f"i-{e['id']}-{j}", "image": e["image"], "title": e["name"],
             "text": t.format(name=e["name"], a_category=a(e["category"]), colour=e["colour"], colour2=e["colour2"]),
             "url": URL + slug(e["name"])} for e in ents for j, t in enumerate(IMAGE_INDEX_TEXTS)]


# ----------------------------------------------------------------------------- rendering

OUTLINES = {  # polygons in radii about the centre (the circle is an ellipse, the star in outline())
    "square": ((-.82, -.82), (.82, -.82), (.82, .82), (-.82, .82)),
    "triangle": ((0, -1), (1, .85), (-1, .85)),
    "diamond": ((0, -1), (1, 0), (0, 1), (-1, 0)),
    "hexagon": tuple((math.cos(i * math.pi / 3), math.sin(i * math.pi / 3)) for i in range(6)),
    "cross": ((-.38, -1), (.38, -1), (.38, -.38), (1, -.38), (1, .38), (.38, .38), (.38, 1), (-.38, 1),
              (-.38, .38), (-1, .38), (-1, -.38), (-.38, -.38)),
    "arrow": ((-1, -.3), (.1, -.3), (.1, -1), (1, 0), (.1, 1), (.1, .3), (-1, .3)),
}


def outline(shape, c=ICON / 2, r=ICON / 2 - 3):
    if shape == "star":  # outer points at r, inner ones at 0.45 r
        return [(c + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                 c - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
    return [(c + r * x, c + r * y) for x, y in OUTLINES[shape]]


def render_icon(e):
    """The category's shape in the main colour, a mark in the second colour."""
    img = Image.new("RGB", (ICON, ICON), BACKGROUND)
    d = ImageDraw.Draw(img)
    main, second = COLOURS[e["colour"]], COLOURS[e["colour2"]]
    m = e["mark"]
    border = {"outline": second, "width": 4} if m == "border" else {"outline": None, "width": 0}
    if e["category"] == "circle":
        d.ellipse([3, 3, ICON - 4, ICON - 4], fill=main, **border)
    else:
        d.polygon(outline(e["category"]), fill=main, **border)
    c = ICON // 2 + (5 if e["category"] == "triangle" else 0)  # a triangle's middle sits low
    filled = {"dot": (7, 7), "bar": (11, 3), "stripe": (3, 11), "box": (6, 6)}  # half width, half height
    if m in filled:
        w, h = filled[m]
        (d.ellipse if m == "dot" else d.rectangle)([c - w, c - h, c + w, c + h], fill=second)
    elif m == "ring":
        d.ellipse([c - 9, c - 9, c + 9, c + 9], outline=second, width=3)
    elif m == "x":
        d.line([c - 8, c - 8, c + 8, c + 8], fill=second, width=4)
        d.line([c - 8, c + 8, c + 8, c - 8], fill=second, width=4)
    return img


def slot_box(i):
    return [i * ICON, 0, (i + 1) * ICON, ICON]


def render_scene(icons):
    """Icons side by side: a crop of slot i is exactly icon i."""
    img = Image.new("RGB", (ICON * len(icons), ICON), BACKGROUND)
    for i, icon in enumerate(icons):
        img.paste(icon, tuple(slot_box(i)[:2]))
    return img


def captions(ents, icons, n_scenes, seed):
    """(image, text) pairs of training entities for the caption warm-up: every icon ("A red star with
    a blue dot."), and n_scenes scenes ("From the left: a red star with a blue dot, a ...")."""
    rng = random.Random(f"{seed}-captions")
    train = [e for e in ents if e["split"] == "train"]
    pairs = [(icons[e["id"]], look(e)[0].upper() + look(e)[1:] + ".") for e in train]
    for _ in range(n_scenes):
        scene = rng.sample(train, rng.randint(2, MAX_SLOTS))
        pairs.append((render_scene([icons[e["id"]] for e in scene]),
                      "From the left: " + ", ".join(look(e) for e in scene) + "."))
    return pairs


# ----------------------------------------------------------------------------- questions

def make_question(qid, kind, target, pool, by_id, rng, crop_fact_share=CROP_WITH_FACT):
    """One question row about `target`; a scene's objects (from `pool`) go to meta["scene"] in slot order."""
    meta = {"kind": kind, "entity": target["id"]}
    obj = "this object"
    attr = rng.choice(list(FREE_QUESTIONS)) if kind == "search_free" else None
    if kind == "crop" or (attr and rng.random() < FREE_ON_SCENE):
        n = rng.randint(2, MAX_SLOTS)
        others = rng.sample([e for e in pool if e is not target], n - 1)
        slot = rng.randrange(n)
        scene = others[:slot] + [target] + others[slot:]
        # named by its category when unique there (never "What shape is the star?"), else its position
        unique = Counter(e["category"] for e in scene)[target["category"]] == 1
        if attr != "shape" and unique and rng.random() < BY_CATEGORY:
            obj = f"the {target['category']}"
        else:
            obj = f"the {ORDINALS[slot]} object from the left"
        meta.update(scene=[e["id"] for e in scene], slot=slot, box=slot_box(slot), ref=obj)
    if kind == "search_free":
        question, answer = rng.choice(FREE_QUESTIONS[attr]), target["category" if attr == "shape" else "colour"]
        meta["attribute"] = attr
    elif kind == "image" or (kind == "crop" and rng.random() >= crop_fact_share):
        question, answer = rng.choice(NAME_QUESTIONS), target["name"]
        meta["relation"] = "name"
    elif kind in ("image_text", "crop"):
        rel = rng.choice(list(RELATIONS))
        question, answer = rng.choice(RELATIONS[rel]["questions"]), target["facts"][rel]
        meta["relation"] = rel
    else:  # multihop
        rel = rng.choice(list(HOP_QUESTIONS))
        maker = by_id[target["maker"]]
        question, answer = rng.choice(HOP_QUESTIONS[rel]), maker["facts"][rel]
        meta.update(relation=rel, hop=maker["id"])
    question = question.format(obj=obj)
    return {"id": qid, "image": f"images/{qid}.png" if "scene" in meta else target["image"],
            "question": question[0].upper() + question[1:], "answers": [answer],
            "needs_search": kind != "search_free", "meta": meta}


def kind_plan(n, mix, rng):
    """n kinds in the shares of `mix` (the remainder to crop), shuffled."""
    kinds = [k for k, share in mix.items() for _ in range(round(n * share))]
    kinds = (kinds + ["crop"] * n)[:n]
    rng.shuffle(kinds)
    return kinds


def make_questions(prefix, kinds, pool, seed, crop_fact_share=CROP_WITH_FACT):
    rng = random.Random(f"{seed}-{prefix}")
    by_id = {e["id"]: e for e in pool}  # makers are drawn from their entity's own split: the pool
    return [make_question(f"{prefix}-{i:05d}", kind, rng.choice(pool), pool, by_id, rng, crop_fact_share)
            for i, kind in enumerate(kinds)]


# ----------------------------------------------------------------------------- the teacher

def read_fact(obs, subject, relation):
    """(the value the top result states about `subject` or None, the subject the top result is about)."""
    top = obs.results[0] if obs.results else {"title": "", "text": ""}
    key = " " + RELATIONS[relation]["key"]
    about = top["title"][:-len(key)] if top["title"].endswith(key) else top["title"]
    head = RELATIONS[relation]["sentence"].format(s=subject, v="")[:-1]  # "X was founded in "
    if about != subject or not top["text"].startswith(head) or not top["text"].endswith("."):
        return None, about
    return top["text"][len(head):-1], about


def teacher(q, image, tk, typo=None):
    """Play one question with the real tools, each action from the last observation. typo: a near-miss
    name for the first text query, corrected after. Returns (messages, attached images, answer, corrected)."""
    meta, state, attached = q["meta"], tools.State(), []
    messages = [{"role": "user", "content": tools.initial_prompt(q["question"], has_image=True)}]
    obj = meta.get("ref", "this object")

    def act(reason, kind, arg="", **where):
        action = tools.Action(kind, arg=arg, reason=reason, **where)
        messages.append({"role": "assistant", "content": action.render()})
        if kind == "answer":
            return None
        obs = tk.execute(action, image, state)
        messages.append({"role": "user", "content": obs.text})
        attached.extend(obs.images)
        return obs

    if meta["kind"] == "search_free":  # the teacher knows the shape and colour it drew
        act(R_FREE[meta["attribute"]].format(obj=obj), "answer", q["answers"][0])
        return messages, attached, q["answers"][0], False
    how = "crop" if "box" in meta else "whole"
    # a crop is asked for as in the paper: a referring expression, which the grounder turns into a box
    obs = act(R_IDENTIFY.format(obj=obj), "img_search", **({"arg": obj} if how == "crop" else {"whole": True}))
    name = obs.results[0]["title"] if obs.results else ""
    if not name:
        return messages, attached, None, False
    found = R_FOUND[how].format(name=name)
    if meta["relation"] == "name":
        act(found, "answer", name)
        return messages, attached, name, False
    chain = ["maker", meta["relation"]] if meta["kind"] == "multihop" else [meta["relation"]]
    reason, subject, corrected = found + R_NEED.format(key=RELATIONS[chain[0]]["key"]), name, False
    for hop, rel in enumerate(chain):
        value = None
        if hop == 0 and typo:
            value, about = read_fact(act(reason, "text_search", fact_title(typo, rel)), subject, rel)
            if value is None:
                reason, corrected = R_WRONG.format(got=about, want=subject), True
        if value is None:
            value, about = read_fact(act(reason, "text_search", fact_title(subject, rel)), subject, rel)
            if value is None:
                return messages, attached, None, corrected
        sentence = fact_sentence(subject, rel, value)
        if hop + 1 < len(chain):
            reason = R_HOP.format(sentence=sentence, key=RELATIONS[chain[hop + 1]]["key"], name=value)
            subject = value
    act(sentence, "answer", value)
    return messages, attached, value, corrected


def save_tool_images(images, out, stem):
    """Save a trajectory's tool images as out/images/<stem>_t<k>.png; returns their paths relative to out."""
    paths = [f"images/{stem}_t{k}.png" for k in range(len(images))]
    for path, img in zip(paths, images):
        img.save(out / path)
    return paths


def make_sft(questions, out, tk, near, seed, self_correct_share, quiet):
    """The teacher's trajectories that reach gold. near: {entity id: its near-miss names} for typos."""
    rng = random.Random(f"{seed}-teacher")
    rows = []
    for q in tqdm(questions, desc="teacher trajectories", disable=quiet):
        typo = None
        if q["meta"].get("relation", "name") != "name" and rng.random() < self_correct_share:  # a text search
            typo = rng.choice(near[q["meta"]["entity"]])
        messages, attached, answer, corrected = teacher(q, Image.open(out / q["image"]).convert("RGB"), tk, typo)
        if answer not in q["answers"]:
            continue
        paths = [q["image"]] + save_tool_images(attached, out, q["id"])
        rows.append({"id": q["id"], "images": paths, "messages": messages, "kind": q["meta"]["kind"],
                     "needs_search": q["needs_search"], "self_correction": corrected, "answers": q["answers"]})
    return rows


# ----------------------------------------------------------------------------- checks

def replay(traj, tk, base):
    """True when `tk` gives back every observation identically and the answer is gold (and, after a
    search, appears in what the tools returned)."""
    image = Image.open(base / traj["images"][0]).convert("RGB")
    state, msgs, seen = tools.State(), traj["messages"], ""
    for i in range(1, len(msgs), 2):
        action = tools.parse_action(msgs[i]["content"])
        if action.kind == "answer":
            return i == len(msgs) - 1 and action.arg in traj["answers"] and (
                not traj["needs_search"] or action.arg in seen)
        if action.kind == "invalid" or i + 1 >= len(msgs):
            return False
        obs = tk.execute(action, image, state)
        if obs.text != msgs[i + 1]["content"]:
            return False
        seen += obs.text
    return False


def image_search_accuracy(index, scene_questions, ents, icons, base):
    """Top-1 accuracy of image search on every slot crop, on whole scenes (the question's entity) and icons."""
    by_id = {e["id"]: e for e in ents}
    crop_hits = scene_hits = 0
    crop_n = sum(len(q["meta"]["scene"]) for q in scene_questions)
    for q in scene_questions:
        img = Image.open(base / q["image"]).convert("RGB")
        for i, eid in enumerate(q["meta"]["scene"]):
            crop_hits += index.search(tools.crop(img, slot_box(i))[0], 1)[0]["title"] == by_id[eid]["name"]
        scene_hits += index.search(img, 1)[0]["title"] == by_id[q["meta"]["entity"]]["name"]
    icon_hits = sum(index.search(icons[e["id"]], 1)[0]["title"] == e["name"] for e in ents)
    return {"crop_of_scene": round(crop_hits / max(crop_n, 1), 4),
            "whole_scene": round(scene_hits / max(len(scene_questions), 1), 4),
            "single_icon": round(icon_hits / len(ents), 4), "crops": crop_n, "scenes": len(scene_questions)}


def tokens_per_trajectory(rows, tiny_dir):
    """Mean and max tokens per SFT trajectory (image tokens included)."""
    proc = M.Processor.from_pretrained(tiny_dir)
    lens = [len(M.render(proc, r["messages"], [Image.open(tiny_dir.parent / p).convert("RGB")
                                                 for p in r["images"]])["input_ids"]) for r in rows]
    return {"mean": round(sum(lens) / max(len(lens), 1), 1), "max": max(lens, default=0)}


# ----------------------------------------------------------------------------- the tiny checkpoint

# Qwen2's split, but a capitalised word or a number up to 4 digits is a piece with nothing joined to its front:
# a name is the same tokens on a page (" by Vukuk Brillan") as in "<answer>Vukuk Brillan" (a random model
# cannot learn that they match). 11% more tokens than Qwen's split.
TINY_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}>]?\p{Ll}+|\p{Lu}\p{L}*|\p{N}{1,4}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s")
CAPTION_PROMPT = "Describe the image."


def train_tokenizer(texts, vocab_size=4096):
    """A byte-level BPE with Qwen2's special tokens and TINY_SPLIT, trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(TINY_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=M.SPECIAL_TOKENS,
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=M.SPECIAL_TOKENS[1:], chat_template=M.chat_template_text(),
        model_max_length=32768, clean_up_tokenization_spaces=False)


def tiny_config(vocab_size, token_ids, hidden=128, layers=4, heads=4, kv_heads=2):
    """Qwen2.5-VL at toy size: patch 14, merge 2, a windowed then a full vision block, M-RoPE scaled."""
    half = hidden // heads // 2
    sec = [half // 4, (half - half // 4) // 2]
    sec.append(half - sum(sec))  # real 7B: [16, 24, 24] for head_dim 128
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=8192, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sec},
                         bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"],
                         pad_token_id=token_ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=True)


def _warmup(model, next_batch, steps, lr, log, name, every):
    """`steps` AdamW steps of next-token loss on the masked tokens of next_batch()."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        b = next_batch()
        loss = -(M.token_logprobs(model, b) * b["loss_mask"]).sum() / b["loss_mask"].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step + 1) % every == 0:
            log(f"{name} warm-up step {step + 1}/{steps}: loss {loss.item():.3f}")
    return model.eval()


def copy_warmup(model, token_ids, steps, seed=0, batch=16, lr=1e-3, log=None):
    """The in-context copying every pretrained LM has: `x1..xn SEP x1..xn` of random tokens, n varying per
    batch (fixed, it learns a positional shortcut). Without it SFT never learns to read a name off results."""
    g, ids = torch.Generator().manual_seed(seed), torch.as_tensor(token_ids)

    def next_batch():
        n = int(torch.randint(4, 13, (1,), generator=g))
        seq = ids[torch.randint(len(ids), (batch, n), generator=g)]  # (B, n)
        x = torch.cat([seq, seq[:, :1] * 0 + ids[0], seq], 1)  # (B, 2n+1): the separator is ids[0]
        mask, T = torch.zeros_like(x), x.shape[1]
        mask[:, n + 1:] = 1
        return {"input_ids": x, "position_ids": torch.arange(T).view(1, 1, T).expand(3, batch, T),
                "attention_mask": torch.ones_like(x), "loss_mask": mask}
    return _warmup(model, next_batch, steps, lr, log, "copy", 500)


def caption_warmup(model, processor, pairs, steps, seed=0, batch=16, lr=1e-3, log=None):
    """The sight a pretrained VLM has: (PIL image, caption) `pairs` as a user and an assistant turn
    (without it the tiny vision tower stays near chance on colours and shapes through SFT)."""
    items = [M.render(processor, [{"role": "user", "content": M.IMAGE + CAPTION_PROMPT},
                                {"role": "assistant", "content": text}], [im]) for im, text in pairs]
    g = torch.Generator().manual_seed(seed)

    def next_batch():
        return M.collate([items[i] for i in torch.randint(len(items), (batch,), generator=g).tolist()], processor)
    return _warmup(model, next_batch, steps, lr, log, "caption", 250)


def build_tiny(out_dir, texts, seed=0, vocab_size=4096, copy_steps=0, captions=(), caption_steps=0, log=None,
               **size):
    """Write a random Qwen2.5-VL checkpoint + processor (`size`: tiny_config's) to `out_dir`, after the
    copy and caption warm-ups (`captions`: (PIL image, text) pairs)."""
    # the chat template's own words, so that they merge like any frequent text
    template = M.conversation_text([{"role": "user", "content": "?"}, {"role": "assistant", "content": "."}])[0]
    tok = train_tokenizer(list(texts) + [template.replace("<|im_start|>", "").replace("<|im_end|>", "")] * 200,
                          vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in M.SPECIAL_TOKENS}
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(len(tok), ids, **size))
    if copy_steps:
        copy_warmup(model, [i for i in range(len(tok)) if i not in ids.values()], copy_steps, seed, log=log)
    processor = M.Processor(tok, Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=224 * 224))
    if caption_steps:
        caption_warmup(model, processor, captions, caption_steps, seed, log=log)
    training.save(model, processor, out_dir, {"step": 0, "tiny": True, "seed": seed, "size": size,
                                              "copy_steps": copy_steps, "caption_steps": caption_steps})
    return out_dir


# ----------------------------------------------------------------------------- build

def counts(rows):
    c = Counter(r.get("kind") or r["meta"]["kind"] for r in rows)
    return {k: c[k] for k in KINDS if c[k]} | {"total": len(rows)}


def build(args, out):
    """Write the world into the new folder `out`. Returns (summary: nothing that varies by run, seconds)."""
    t0 = time.time()
    (out / "images").mkdir(parents=True)
    ents, cities, pools = make_entities(args.n_entities, args.held_out, args.seed)
    distractors = make_distractors(ents, cities, pools, args.n_distractors, args.seed)
    icons = {e["id"]: render_icon(e) for e in tqdm(ents, desc="icons", disable=args.quiet)}
    for e in ents:
        icons[e["id"]].save(out / e["image"])
    corpus = make_corpus(ents, distractors, args.seed)
    tools.write_jsonl(out / "entities.jsonl", ents)
    tools.write_jsonl(out / "corpus.jsonl", corpus)
    tools.write_jsonl(out / "image_index.jsonl", make_image_index(ents))

    train = [e for e in ents if e["split"] == "train"]
    held = [e for e in ents if e["split"] == "heldout"]
    plan_rng = random.Random(f"{args.seed}-plan")
    sets = {  # question rows per file
        "sft": make_questions("sft", kind_plan(args.n_sft, SFT_MIX, plan_rng), train, args.seed),
        "rl": make_questions("rl", kind_plan(args.n_rl, RL_MIX, plan_rng), train, args.seed),
        "eval": make_questions("eval", [KINDS[i % len(KINDS)] for i in range(args.n_eval)], held, args.seed),
        "hard": make_questions("hard", ["multihop", "crop"] * (args.n_eval // 2), held, args.seed, crop_fact_share=1.0),
    }
    all_questions = [q for rows in sets.values() for q in rows]
    scene_questions = [q for q in all_questions if "scene" in q["meta"]]  # one scene image each
    for q in tqdm(scene_questions, desc="scenes", disable=args.quiet):
        render_scene([icons[i] for i in q["meta"]["scene"]]).save(out / q["image"])
    near = {}
    for d in distractors:
        near.setdefault(d["of"], []).append(d["name"])
    sft = make_sft(sets["sft"], out, search.make_tools(str(out)), near, args.seed, args.self_correct, args.quiet)
    files = {"sft": sft, "rl": sets["rl"], "questions_train": sets["sft"] + sets["rl"],
             "questions_eval": sets["eval"], "questions_hard": sets["hard"]}
    for name, rows in files.items():
        tools.write_jsonl(out / f"{name}.jsonl", rows)
    seconds = {"world": time.time() - t0}

    # checks, from the files just written, through fresh backends (as any later script builds them)
    replay_tools = search.make_tools(str(out))
    replayed = sum(replay(t, replay_tools, out) for t in tqdm(sft, desc="replay", disable=args.quiet))
    index = replay_tools.image_backend
    summary = {
        "build": build_key(args),
        "entities": {"train": len(train), "heldout": len(held), "distractor_names": len(distractors)},
        "corpus_pages": len(corpus), "image_index_rows": len(index.rows), "scenes": len(scene_questions),
        "files": {name: counts(rows) for name, rows in files.items()},
        "sft_search_required": sum(t["needs_search"] for t in sft),
        "sft_self_correction": sum(t["self_correction"] for t in sft),
        "teacher": {"attempted": len(sets["sft"]), "reached_gold": len(sft),
                    "rate": round(len(sft) / max(len(sets["sft"]), 1), 4)},
        "replay": {"trajectories": len(sft), "reached_gold": replayed, "rate": round(replayed / max(len(sft), 1), 4)},
        "image_search_top1": image_search_accuracy(index, scene_questions, ents, icons, out),
    }
    seconds["checks"] = time.time() - t0 - seconds["world"]
    if not args.no_tiny:
        t1 = time.time()
        # the tokenizer learns from every text the model will see: pages, prompts, trajectories
        texts = [f"{r['title']}\n{r['text']}" for r in corpus]
        texts += [tools.initial_prompt(q["question"], has_image=q["image"] is not None) for q in all_questions]
        texts += [m["content"] for t in sft for m in t["messages"]]
        build_tiny(out / "tiny", texts, seed=args.seed, vocab_size=args.vocab_size,
                   log=None if args.quiet else tqdm.write, hidden=args.hidden, layers=args.layers,
                   heads=args.heads, kv_heads=max(1, args.heads // 2), copy_steps=args.copy_steps,
                   caption_steps=args.caption_steps,
                   captions=captions(ents, icons, len(train), args.seed) if args.caption_steps else ())
        summary["sft_tokens"] = tokens_per_trajectory(sft, out / "tiny")
        seconds["tiny tokenizer+checkpoint"] = time.time() - t1
    return summary, seconds


def install(tmp, out):
    """Replace our outputs in `out` by `tmp`'s; other files (a search cache) stay."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        old = out / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        if (tmp / name).exists():
            (tmp / name).rename(old)
    shutil.rmtree(tmp)


def print_summary(s):
    print(f"entities: {s['entities']['train']} train, {s['entities']['heldout']} held out, "
          f"{s['entities']['distractor_names']} near-miss names; corpus {s['corpus_pages']} pages, "
          f"image index {s['image_index_rows']} rows, {s['scenes']} scenes")
    print(f"{'file':<16}" + "".join(f"{k:>12}" for k in (*KINDS, "total")))
    for name, c in s["files"].items():
        print(f"{name:<16}" + "".join(f"{c.get(k, 0):>12}" for k in (*KINDS, "total")))
    print(f"sft: {s['sft_search_required']} search-required / {s['files']['sft']['total']}, "
          f"{s['sft_self_correction']} with self-correction"
          + (f", {s['sft_tokens']['mean']} tokens mean, {s['sft_tokens']['max']} max" if "sft_tokens" in s else ""))
    t, r, i = s["teacher"], s["replay"], s["image_search_top1"]
    print(f"teacher reached gold: {t['reached_gold']}/{t['attempted']} = {t['rate']:.4f}")
    print(f"replay of sft.jsonl through the local backends reached gold: {r['reached_gold']}/{r['trajectories']} "
          f"= {r['rate']:.4f}")
    print(f"image search top-1: crops of scenes {i['crop_of_scene']:.4f} ({i['crops']} crops), "
          f"whole scenes {i['whole_scene']:.4f} ({i['scenes']} scenes), single icons {i['single_icon']:.4f}")


def main(argv=None):
    args = get_args(argv)
    out = Path(args.out)
    summary_path = out / "summary.json"
    if not args.force and summary_path.is_file():
        old = json.loads(summary_path.read_text())
        if old.get("build") == build_key(args):
            print(f"make_data: {out} is up to date (same arguments); --force rebuilds it")
            print_summary(old)
            return old
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    summary, seconds = build(args, tmp)
    (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    install(tmp, out)
    print_summary(summary)
    print("time: " + ", ".join(f"{phase} {s:.1f}s" for phase, s in seconds.items()) + f"; written to {out}/")
    return summary


if __name__ == "__main__":
    main()
