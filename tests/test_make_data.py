"""The synthetic world: determinism, the entity split, well-formed teacher trajectories, replay, image search.

    python -m pytest -q tests/test_make_data.py
"""
import json
import re
import shutil

import pytest

import make_data
import model
import search
import tools
from eval import score

ARGS = ["--small", "--no_tiny", "--quiet"]


def build(out, capsys=None):
    summary = make_data.main(ARGS + ["--out", str(out)])
    printed = capsys.readouterr().out if capsys else ""
    return summary, printed


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "data"
    return out, build(out)[0]


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_builds_identical_and_rerun_skips(world, tmp_path, capsys):
    out, _ = world
    other = tmp_path / "again"
    build(other)
    a, b = files_of(out), files_of(other)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    _, printed = build(other, capsys)  # same arguments: nothing is rebuilt
    assert "up to date" in printed
    assert files_of(other) == b


def test_held_out_entities_never_reach_training_files(world):
    out, _ = world
    ents = tools.read_jsonl(out / "entities.jsonl")
    held = [e for e in ents if e["split"] == "heldout"]
    assert held and len(held) < len(ents)
    for name in ("sft.jsonl", "rl.jsonl", "questions_train.jsonl"):
        text = (out / name).read_text()
        for e in held:
            assert e["name"] not in text, (name, e["name"])
            assert f'"{e["id"]}"' not in text and e["image"] not in text, (name, e["id"])
    # name words come from shared pools: a held-out name is a pair never seen in training, of words seen there
    words = {w for e in ents if e["split"] == "train" for w in e["name"].split()}
    assert all(set(e["name"].split()) <= words for e in held)
    held_ids = {e["id"] for e in held}
    for name in ("questions_eval.jsonl", "questions_hard.jsonl"):
        for q in tools.read_jsonl(out / name):
            assert q["meta"]["entity"] in held_ids


def test_sft_trajectories_well_formed(world):
    out, _ = world
    rows = tools.read_jsonl(out / "sft.jsonl", strict=True)
    assert rows
    for r in rows:
        msgs = r["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2), r["id"]
        assert msgs[0]["content"].startswith("<image>\n")
        assert sum(m["content"].count("<image>") for m in msgs) == len(r["images"]), r["id"]
        assert all((out / p).is_file() for p in r["images"])
        actions = [tools.parse_action(m["content"]) for m in msgs if m["role"] == "assistant"]
        assert all(a.kind != "invalid" for a in actions), r["id"]
        assert [a.kind == "answer" for a in actions] == [False] * (len(actions) - 1) + [True], r["id"]
        assert all(m["content"].startswith("<information>") for m in msgs[2::2])
        assert actions[-1].arg in r["answers"] and score(actions[-1].arg, r["answers"]) == 1.0, r["id"]
        assert r["needs_search"] == (len(actions) > 1)
        assert sum(a.kind == "img_search" for a in actions) <= 1


def test_sft_mix(world):
    out, summary = world
    rows = tools.read_jsonl(out / "sft.jsonl")
    n_search = sum(r["needs_search"] for r in rows)
    assert abs(n_search / len(rows) - 0.5) < 0.05
    assert {r["kind"] for r in rows} == set(make_data.KINDS)
    assert any(r["self_correction"] for r in rows)
    assert summary["files"]["sft"]["total"] == len(rows)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_replay_rate(world, tmp_path, capsys):
    out, summary = world
    assert summary["teacher"]["rate"] >= 0.99
    assert summary["replay"]["rate"] >= 0.99
    _, printed = build(out, capsys)  # the printed summary says it too
    rate = float(re.search(r"replay of sft\.jsonl.*= ([0-9.]+)", printed).group(1))
    assert rate >= 0.99


def test_crop_search_beats_whole_scene_search(world):
    _, summary = world
    acc = summary["image_search_top1"]
    assert acc["crop_of_scene"] >= 0.95
    assert acc["whole_scene"] <= acc["crop_of_scene"] - 0.3
    assert acc["single_icon"] >= 0.99


def scene_of(ents):
    icons = [make_data.render_icon(e) for e in ents]
    return make_data.render_scene(icons)


@pytest.fixture(scope="module")
def grounder(world):
    out, _ = world
    return search.SceneGrounder.from_entities(out / "entities.jsonl")  # training entities' icons


def test_scene_grounder_finds_the_nth_object(world, grounder):
    out, _ = world
    ents = tools.read_jsonl(out / "entities.jsonl")[:4]
    scene = scene_of(ents)
    for i, word in enumerate(make_data.ORDINALS):
        box = grounder.ground(scene, f"the {word} object from the left")
        x1, y1, x2, y2 = make_data.slot_box(i)
        assert x1 <= box[0] < box[2] <= x2 and box[2] - box[0] > 30, (word, box)
        assert grounder.ground(scene, f"The {word} object from the right.") == \
            grounder.ground(scene, f"the {make_data.ORDINALS[3 - i]} object from the left")
    assert grounder.ground(make_data.render_scene([make_data.render_icon(ents[0])] * 2),
                           "the third object from the left") is None


def test_scene_grounder_tells_held_out_shapes_apart(world, grounder):
    out, _ = world
    held = [e for e in tools.read_jsonl(out / "entities.jsonl") if e["split"] == "heldout"]
    held = [e for e in held if e["category"] in grounder.names]  # a shape no training entity has is unknown
    assert len(held) >= 5
    for e in held:  # one object alone, its silhouette against the training entities' mean ones
        (box, mask), = grounder.objects(make_data.render_icon(e))
        assert grounder.shape_of(mask) == e["category"], e["id"]


def test_scene_grounder_names_one_object_or_none(world, grounder):
    out, _ = world
    ents = [e for e in tools.read_jsonl(out / "entities.jsonl") if e["category"] in grounder.names]
    a = ents[0]
    b = next(e for e in ents if e["category"] != a["category"])
    box = grounder.ground(scene_of([b, a]), f"the {a['category']}")
    assert make_data.slot_box(1)[0] <= box[0] and box[2] <= make_data.slot_box(1)[2]
    assert grounder.ground(scene_of([a, b, a]), f"the {a['category']}") is None  # two of them: ambiguous
    assert grounder.ground(scene_of([b, b]), f"the {a['category']}") is None  # none of them
    assert grounder.ground(scene_of([a, b]), "a cat") is None


def test_crop_trajectories_ask_for_the_object_the_question_names(world):
    out, _ = world
    rows = [r for r in tools.read_jsonl(out / "sft.jsonl") if r["kind"] == "crop"]
    assert rows
    for r in rows:
        first = tools.parse_action(r["messages"][1]["content"])
        assert first.kind == "img_search" and first.box is None and not first.whole
        assert first.arg.lower() in r["messages"][0]["content"].lower()  # copied from the question
        assert r["messages"][2]["content"].startswith("<information>")  # grounded and searched


def test_question_files_load(world):
    out, _ = world
    for name in ("questions_train.jsonl", "rl.jsonl", "questions_eval.jsonl", "questions_hard.jsonl"):
        qs = tools.load_questions(out / name)
        assert qs and all(q["answers"] and q["meta"]["kind"] in make_data.KINDS for q in qs)
    hard = tools.load_questions(out / "questions_hard.jsonl")
    assert {q["meta"]["kind"] for q in hard} == {"multihop", "crop"}
    assert all(q["meta"]["relation"] != "name" for q in hard)


def test_attached_crops_are_saved_in_order(world, tmp_path):
    """With attach="crop" the tools put the searched crop in the observation: the trajectory lists
    it after the question image, one file per "<image>" placeholder."""
    out = tmp_path / "w"
    shutil.copytree(world[0], out)
    crops = [q for q in tools.read_jsonl(out / "rl.jsonl") if q["meta"]["kind"] == "crop"][:4]
    rows = make_data.make_sft(crops, out, search.make_tools(str(out), attach="crop"), {}, 0, 0.0, True)
    assert len(rows) == len(crops)
    for r in rows:
        assert len(r["images"]) == 2 and sum(m["content"].count("<image>") for m in r["messages"]) == 2
        assert (out / r["images"][1]).is_file()


def test_tiny_checkpoint_is_built_from_the_world(tmp_path):
    out = tmp_path / "data"
    summary = make_data.main(["--small", "--quiet", "--out", str(out)])
    proc = model.Processor.from_pretrained(out / "tiny")
    traj = tools.read_jsonl(out / "sft.jsonl")[0]
    text = traj["messages"][1]["content"]
    assert proc.decode(proc.encode(text)) == text
    assert 0 < summary["sft_tokens"]["mean"] <= summary["sft_tokens"]["max"]
