"""Shared fixtures: one tiny Qwen2.5-VL checkpoint per test session (built in seconds on CPU)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY_TEXTS = [
    "<reason>I need to identify the object in the image.</reason><img_search><img></img_search>",
    "<reason>The object is Kessin Valor. I need its founding year.</reason><text_search>Kessin Valor founded</text_search>",
    "<information>Kessin Valor: a star founded in 1843 in Orvale.</information>",
    "<reason>It was founded in 1843.</reason><answer>1843</answer>",
    "<img_search>[0, 0, 56, 56]</img_search> What is the name of this object? Answer with a short phrase.",
] * 20


def template_messages(messages):
    """Design-format messages (string content, `<image>` placeholders) -> the list-of-parts form that
    the real chat template (tokenizer.apply_chat_template) takes: what model.render is checked against."""
    out = []
    for m in messages:
        parts = []
        for i, piece in enumerate(m["content"].split("<image>")):
            parts += ([{"type": "image"}] if i else []) + ([{"type": "text", "text": piece}] if piece else [])
        out.append({"role": m["role"], "content": parts})
    return out


def icon(colour):
    """A 56 x 56 test icon: a coloured disc on white (one vision patch after merging is 28 px)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (56, 56), "white")
    ImageDraw.Draw(im).ellipse([6, 6, 50, 50], fill=colour)
    return im


def write_world(folder):
    """A four-entity world on disk in the data formats make_data.py writes: image index, corpus, and
    RL prompts (rl.jsonl) that ask which entity an icon shows."""
    import json
    rows, corpus, qs = [], [], []
    (folder / "images").mkdir(exist_ok=True)
    for i, c in enumerate(["red", "blue", "green", "orange"]):
        icon(c).save(folder / "images" / f"{c}.png")
        rows.append({"id": f"e{i}", "image": f"images/{c}.png", "title": f"Entity {c}", "text": f"The {c} one.",
                     "url": f"http://x/{c}"})
        corpus.append({"id": f"p{i}", "title": f"Entity {c}", "text": f"Entity {c} was founded in 18{i}0.",
                       "url": f"http://x/{c}"})
        qs.append({"id": f"q{i}", "image": f"images/{c}.png", "question": "What is this?",
                   "answers": [f"Entity {c}"], "needs_search": True, "meta": {"kind": "image"}})
    for name, data in (("image_index", rows), ("corpus", corpus), ("rl", qs)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return folder


def write_bad_questions(folder, good):
    """A questions file beside `good` rows (image paths relative to folder) with every kind of bad row a
    careless user or a broken download gives: a missing, a truncated and a non-image file, wrong
    field types, invalid UTF-8, not JSON. Returns (path, the ids that must come through, the bad
    ones that are skipped at load with a warning)."""
    import json
    from PIL import Image
    icon("red").save(folder / "trunc.png")
    data = (folder / "trunc.png").read_bytes()
    (folder / "trunc.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("not an image")
    Image.new("RGB", (1, 600), "red").save(folder / "thin.png")  # the processor refuses this aspect ratio
    base = dict(good[0], question="What is this?", answers=["x"])
    unusable = [dict(base, id="b_img", image="missing.png"), dict(base, id="b_trunc", image="trunc.png"),
                dict(base, id="b_text", image="text.png"), dict(base, id="b_thin", image="thin.png")]
    refused = [dict(base, id="f_ans5", answers=5.5), dict(base, id="f_null", answers=None),
               dict(base, id="f_img", image=5), dict(base, id="f_meta", meta="x"), dict(base, id="f_q", question="")]
    lines = [json.dumps(r) for r in good + unusable + refused]
    lines += ["not json", "[1, 2]"]
    raw = "\n".join(lines).encode() + b"\n" + b'{"id": "f_utf", "question": "\xff", "answers": ["x"]}\n'
    path = folder / "hostile.jsonl"
    path.write_bytes(raw)
    # f_ans5 is fine: a number is one answer ("5.5")
    return path, [r["id"] for r in good + unusable] + ["f_ans5"], [r["id"] for r in refused if r["id"] != "f_ans5"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    import make_data
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    make_data.build_tiny(out, TINY_TEXTS, seed=0, vocab_size=600)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    import model
    m, p = model.load(tiny_dir, log=None)
    return m, p


@pytest.fixture(scope="session")
def hub_dir(tmp_path_factory):
    """A checkpoint laid out like the hub's Qwen2.5-VL-3B-Instruct with the real vocabulary (tests/hub.py)."""
    import hub
    if hub.qwen_tiktoken_file() is None:
        pytest.skip("the real Qwen2 vocabulary (qwen_agent/utils/qwen.tiktoken) is not installed: "
                    "pip install --no-deps -r requirements-test.txt")
    return hub.build_hub_checkpoint(tmp_path_factory.mktemp("hub") / "Qwen2.5-VL-3B-Instruct")
