"""eval.py: the scorer, the LLM judge (against a fake local endpoint), metrics and the tables, the HTML
report (escaping, inlined images, headless Chromium), the three modes on a tiny model, an evaluation
sharded over two ranks, --compare and its statistics. The benchmark loaders: tests/test_loaders.py.

    python -m pytest -q tests/test_eval.py
"""
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image, ImageDraw

import eval as E
import search as S
import tools as T
from conftest import icon

# ============================================================================ scorer


@pytest.mark.parametrize("pred, answers", [
    ("Paris", ["paris"]),
    ("  The Eiffel Tower! ", ["Eiffel Tower"]),          # case, articles, punctuation
    ("U.S.", ["US"]),
    ("Galápagos", ["Galapagos"]),                        # accents
    ("o'brien", ["OBrien"]),
    ("Lutetia", ["Paris", "Lutetia", "Parigi"]),          # any alias
    ("the answer is Paris", ["Paris"]),                  # gold plus at most two words
    ("Eiffel Tower in Paris", ["Eiffel Tower"]),
    ("莱昂纳多", ["莱昂纳多"]),
    ("0", [0, "zero"]),                                  # non-string aliases
])
def test_score_aliases_case_punctuation(pred, answers):
    assert E.score(pred, answers) == 1.0


@pytest.mark.parametrize("pred, answers", [
    ("London", ["Paris"]),
    ("Paris or London", ["Paris"]),                      # hedges and lists are not the gold
    ("not Paris", ["Paris"]),
    ("the Eiffel Tower in Paris, the capital of France", ["Eiffel Tower"]),  # too long for the rules
    ("Boeing 737", ["Boeing 747"]),
    (T.GIVE_UP, ["Paris"]),
])
def test_score_rejects(pred, answers):
    assert E.score(pred, answers) == 0.0


@pytest.mark.parametrize("pred", [None, "", "   ", "\n"])
def test_score_empty_or_missing_is_zero(pred):
    assert E.score(pred, ["Paris"]) == 0.0
    assert E.score(pred, [""]) == 0.0


@pytest.mark.parametrize("pred, gold, ok", [
    ("1,000", "1000", True),
    ("8848", "8,848 m", True),                 # a unit on one side only
    ("8,848 metres", "8848 m", True),
    ("29,029 ft", "8848 m", True),             # unit conversions, rounded figures
    ("8.85 km", "8848 m", True),
    ("8.7 km", "8848 m", False),
    ("11 lbs", "5 kg", True),
    ("5 kg", "5 km", False),                   # different dimensions
    ("100 °F", "37.8 °C", True),
    ("45%", "45 percent", True),
    ("$5 million", "5,000,000 USD", True),
    ("three", "3", True),                      # number words
    ("3.14", "3.14159", True),                 # reasonable rounding of the gold
    ("3", "3.14159", False),                   # one significant digit is not a rounding
    ("12", "12.3", True),
    ("1,200", "1,234", True),
    ("1.5 million", "1,523,000", True),
    ("2 million", "1,600,000", False),
    ("3.1", "3.14", True),
    ("1990", "1990", True),                    # years are exact
    ("1991", "1990", False),
    ("2000", "1990", False),
    ("1990-05-12", "1990-05-12", True),        # dates are text, not numbers
    ("1990-05-13", "1990-05-12", False),
])
def test_score_numbers(pred, gold, ok):
    assert E.score(pred, [gold]) == float(ok), E.parse_quantity(pred)


@pytest.mark.parametrize("pred, gold, ok", [
    ("1.05", "0.9 - 1.1", True),               # a number inside a gold range (InfoSeek's answer_eval)
    ("1.2", "0.9 - 1.1", False),
    ("0.95 to 1.05", "0.9 - 1.1", True),       # a range inside the gold range
    ("between 8,000 and 9,000 m", "8848 m", True),   # a narrow range containing the gold
    ("8000-9000", "8848", True),
    ("0 to 1 million", "8848", False),         # a range that says nothing
    ("1995-1996", "1995", True),
    ("1990-2000", "1995", False),              # a decade is not a year
    ("1990-1995", "1993", True),               # the paper's judge: a range containing the gold year
    ("between 1990 and 1995", "1993", True),
    ("1990-1995", "1997", False),
])
def test_score_ranges(pred, gold, ok):
    assert E.score(pred, [gold]) == float(ok)


def test_parse_quantity_leaves_text_alone():
    for text in ("Boeing 747", "May 5, 1990", "1990-05-12", "5th avenue", "Paris"):
        assert E.parse_quantity(text) is None, text
    q = E.parse_quantity("about 5 to 6 million km")
    assert (q.lo, q.hi, q.unit) == (5e6, 6e6, "km")


# ============================================================================ LLM judge

class FakeJudgeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions: 'correct' iff the prediction mentions Lutetia."""
    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        prompt = body["messages"][0]["content"]
        prediction = prompt.split("Prediction:", 1)[1].split("\n", 1)[0]
        reply = "correct" if "Lutetia" in prediction else "Incorrect."
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture
def judge_server():
    FakeJudgeHandler.requests = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudgeHandler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", FakeJudgeHandler.requests
    srv.shutdown()
    srv.server_close()


def test_judge_decides_what_rules_miss_and_caches(judge_server, tmp_path, monkeypatch):
    url, reqs = judge_server
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test")
    cache = tmp_path / "judge.sqlite"
    j = E.Judge(url, "judge-model", cache=cache, api_key_env="JUDGE_TEST_KEY", retries=0)
    q = "Which city is this?"
    assert E.score("Paris", ["Paris"], question=q, judge=j) == 1.0        # rules match: no call
    assert reqs == []
    assert E.score("Lutetia", ["Paris"], question=q, judge=j) == 1.0
    assert E.score("Lyon", ["Paris"], question=q, judge=j) == 0.0
    assert len(reqs) == 2 and reqs[0]["path"] == "/v1/chat/completions"
    assert reqs[0]["body"]["model"] == "judge-model" and reqs[0]["auth"] == "Bearer sk-test"
    prompt = reqs[0]["body"]["messages"][0]["content"]
    assert q in prompt and "Ground-truth answers" in prompt and "Lutetia" in prompt
    assert E.score("", ["Paris"], question=q, judge=j) == 0.0             # empty: never judged
    # a new judge on the same cache answers from it without asking
    j2 = E.Judge(url, "judge-model", cache=cache, retries=0)
    assert E.score("Lutetia", ["Paris"], question=q, judge=j2) == 1.0
    assert E.score("Lyon", ["Paris"], question=q, judge=j2) == 0.0
    assert len(reqs) == 2 and j2.hits == 2 and j2.calls == 0


def test_judge_unreachable_keeps_rule_score(tmp_path, capsys):
    j = E.Judge("http://127.0.0.1:9", "m", cache=tmp_path / "c.sqlite", retries=0, timeout=2)
    assert j("q?", "Lutetia", ["Paris"]) is None
    assert E.score("Lutetia", ["Paris"], question="q?", judge=j) == 0.0
    assert j.errors == 2 and "keeping the rule-based score" in capsys.readouterr().err


def test_parse_verdict():
    assert E.parse_verdict("Correct") is True
    assert E.parse_verdict("incorrect.") is False
    assert E.parse_verdict("The prediction is not correct") is False
    assert E.parse_verdict("maybe") is None


# ============================================================================ metrics, table, report

def step(text, kind, arg="", obs=None, error=False, box=None, whole=False, results=(), reason="r"):
    return {"text": text, "action": {"kind": kind, "arg": arg, "box": box, "whole": whole, "reason": reason,
                                     "error": ""},
            "obs": None if obs is None else {"text": obs, "kind": kind, "error": error, "box": box,
                                             "results": list(results)}}


def record(qid, mode, score, image=None, n_text=0, n_image=0, n_crop=0, n_errors=0, steps=(), kind=None,
           answer="x", bench="synthetic"):
    return {"bench": bench, "mode": mode, "index": int(qid[-1]), "qid": qid, "question": f"Question {qid}?",
            "image": image, "answers": ["gold"], "meta": {"kind": kind} if kind else {}, "answer": answer,
            "score": score, "judged": False, "finish": "answer", "turns": len(steps) or 1, "gen_tokens": 10,
            "n_text": n_text, "n_image": n_image, "n_crop": n_crop, "n_errors": n_errors, "steps": list(steps)}


def test_metrics_and_table():
    recs = [record("q0", "agent", 1.0, n_text=2, n_crop=1, kind="crop"),
            record("q1", "agent", 0.0, n_errors=1, kind="image"),
            record("q2", "agent", 1.0, n_image=1, kind="image"),
            record("q3", "agent", 0.0, n_text=1, kind="crop")]
    m = E.metrics(recs, wall_s=8.0)
    assert m["n"] == 4 and m["accuracy"] == 0.5 and m["searched"] == 0.75
    assert (m["text_per_q"], m["image_per_q"], m["crop_per_q"]) == (0.75, 0.25, 0.25)
    assert m["tool_errors"] == 0.25 and m["s_per_q"] == 2.0 and m["gen_tokens"] == 10
    assert m["by_kind"] == {"crop": {"n": 2, "accuracy": 0.5}, "image": {"n": 2, "accuracy": 0.5}}
    results = {"synthetic": {"direct": E.metrics(recs[1:2]), "agent": m}, "infoseek": {"agent": E.metrics(recs[:1])}}
    table = E.markdown_table(results)
    lines = table.splitlines()
    assert lines[0] == "| Mode | synthetic | infoseek | Avg |"
    assert lines[2] == "| Direct answer (no search) | 0.0 | - | 0.0 |"
    assert lines[3] == "| Agent (on-demand search) | 50.0 | 100.0 | 75.0 |"
    assert "| synthetic | agent | 4 | 50.0 | 75.0 | 0.75 | 0.25 | 0.25 |" in table
    assert "accuracy by kind" in table


HOSTILE = '<script>alert("x")</script>'


def hostile_records(tmp_path):
    img = Image.new("RGB", (112, 56), "white")
    ImageDraw.Draw(img).ellipse([62, 6, 106, 50], fill="blue")
    path = tmp_path / "scene.png"
    img.save(path)
    steps = [
        step(f"<reason>{HOSTILE}</reason><img_search>[56, 0, 112, 56]</img_search>", "img_search",
             "[56, 0, 112, 56]", obs=f"<information>Blue {HOSTILE}</information>", box=[56, 0, 112, 56],
             results=[{"title": f"Blue {HOSTILE}", "text": f"web text {HOSTILE}",
                       "url": 'javascript:alert("u")'}], reason=HOSTILE),
        step("<reason>Search.</reason><text_search>blue founded</text_search>", "text_search", "blue founded",
             obs="<information>nothing</information>", error=True),
        step("<reason>ok</reason><answer>1843</answer>", "answer", "1843"),
    ]
    return [record("q0", "agent", 1.0, image=str(path), n_crop=1, n_errors=1, steps=steps, answer=HOSTILE),
            record("q1", "direct", 0.0, answer=None,
                   steps=[step(f"<bad>{HOSTILE}", "invalid", obs=f"<information>{HOSTILE}</information>",
                               error=True)])]


def test_report_escapes_and_is_self_contained(tmp_path):
    recs = hostile_records(tmp_path)
    results = {"synthetic": {"agent": E.metrics(recs[:1]), "direct": E.metrics(recs[1:])}}
    out = E.write_report(tmp_path / "r" / "report.html", recs, results)
    page = out.read_text()
    assert "<script" not in page.lower()                       # neither model nor web text runs
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert 'href="javascript' not in page and "javascript:alert" in page.replace("&quot;", '"')
    assert page.count("data:image/jpeg;base64,") == 2         # the boxed image and the crop, inlined
    assert "src=\"http" not in page and "<link" not in page  # nothing to fetch
    assert "(no answer)" in page and "1 crop box(es) drawn" in page and "(LLM judge)" not in page
    assert "✓" in page and "✗" in page


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs /usr/bin/chromium")
def test_report_renders_in_headless_chromium(tmp_path):
    recs = hostile_records(tmp_path)
    page = E.write_report(tmp_path / "report.html", recs, {"synthetic": {"agent": E.metrics(recs)}})
    shot = tmp_path / "shot.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           f"--screenshot={shot}", "--window-size=1000,1400", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1000, 1400)
    colours = im.getcolors(1 << 20)
    assert colours and len(colours) > 50                     # text, tables and images, not a blank page
    # the unfolded first trajectory shows the scene: its blue icon is on screen
    assert sum(n for n, (r, g, b) in colours if b > 180 and r < 80 and g < 80) > 100


# ============================================================================ the three modes on a tiny model

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A four-entity world: corpus, image index and questions files, as make_data writes them."""
    d = tmp_path_factory.mktemp("evalworld")
    (d / "images").mkdir()
    corpus, index, qs = [], [], []
    for i, c in enumerate(["red", "blue", "green"]):
        icon(c).save(d / "images" / f"{c}.png")
        index.append({"id": f"e{i}", "image": f"images/{c}.png", "title": f"Entity {c}",
                      "text": f"The {c} one.", "url": f"http://x/{c}"})
        corpus.append({"id": f"p{i}", "title": f"Entity {c} founded", "text": f"Entity {c} was founded in 18{40 + i}.",
                       "url": f"http://x/{c}/f"})
        qs.append({"id": f"q{i}", "image": f"images/{c}.png", "question": f"When was this {c} object founded?",
                   "answers": [f"18{40 + i}"], "needs_search": True, "meta": {"kind": "image_text"}})
    qs.append({"id": "q_text", "image": None, "question": "When was Entity red founded?", "answers": ["1840"],
               "needs_search": True, "meta": {"kind": "multihop"}})
    T.write_jsonl(d / "corpus.jsonl", corpus)
    T.write_jsonl(d / "image_index.jsonl", index)
    T.write_jsonl(d / "questions_eval.jsonl", qs)
    return d


KW = dict(max_turns=3, max_new_tokens=12, batch_size=4)


def test_direct_mode_never_searches(tiny, world):
    model, proc = tiny
    tl = S.make_tools(world)
    qs = T.load_questions(world / "questions_eval.jsonl")
    trajs = E.run_mode("direct", model, proc, tl, qs, **KW)
    assert len(trajs) == len(qs) and tl.max_calls == 10            # the caller's tools are untouched
    for q, t in zip(qs, trajs):
        assert t.qid == q["id"] and t.n_text_search == t.n_img_search == 0
        assert t.turns == 1 and not t.observations                 # one turn: an answer, or nothing
        assert t.finish == "answer" or t.answer is None


def test_rag_mode_runs_the_fixed_workflow(tiny, world):
    model, proc = tiny
    qs = T.load_questions(world / "questions_eval.jsonl")
    trajs = E.run_mode("rag", model, proc, S.make_tools(world), qs, **KW)
    assert [t.qid for t in trajs] == [q["id"] for q in qs]         # back in question order
    for q, t in zip(qs, trajs):
        forced = E.RAG_TURNS if q["image"] is not None else E.RAG_TURNS[1:]
        assert t.texts[:len(forced)] == [f.replace("{question}", q["question"]) for f in forced]
        assert [o.kind for o in t.observations[:len(forced)]] == ["img_search", "text_search"][-len(forced):]
        assert t.n_text_search == 1 and t.n_img_search == (1 if q["image"] else 0)
        assert len(t.observations) == len(forced) and t.turns == len(forced) + 1  # then one answer turn
        assert t.finish == "answer" or t.answer is None
    # the whole-image search found the entity, the question search found pages
    assert "Entity red" in trajs[0].observations[0].text


def test_agent_mode_and_records(tiny, world):
    model, proc = tiny
    qs = T.load_questions(world / "questions_eval.jsonl")
    recs, wall = E.evaluate("agent", model, proc, S.make_tools(world), qs, "synthetic", progress=False, **KW)
    assert [r["index"] for r in recs] == list(range(len(qs))) and wall > 0
    for r, q in zip(recs, qs):
        assert r["qid"] == q["id"] and r["mode"] == "agent" and 1 <= r["turns"] <= 3
        assert len(r["steps"]) == r["turns"] and r["gen_tokens"] > 0
        assert r["score"] == E.score(r["answer"], q["answers"])
    json.dumps(recs)                                                # records are plain JSON
    assert E.metrics(recs)["n"] == len(qs)


def _evaluate_worker(rank, world, init, ckpt, data):
    import torch.distributed as dist
    import model as M
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, proc = M.load(ckpt, log=None)
        qs = T.load_questions(data / "questions_eval.jsonl")
        recs, _ = E.evaluate("direct", model, proc, S.make_tools(data), qs, "synthetic", rank=rank, world=world,
                             max_new_tokens=4, progress=False)
        assert [(r["index"], r["qid"]) for r in recs] == [(i, q["id"]) for i, q in enumerate(qs)]
    finally:
        dist.destroy_process_group()


def test_evaluate_over_two_gloo_ranks_gathers_every_question_in_order(tiny_dir, world, tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_evaluate_worker, args=(2, (tmp_path / "init").as_uri(), tiny_dir, world), nprocs=2, join=True)


def test_cli_runs_all_modes_and_writes_outputs(tiny_dir, world, tmp_path, capsys):
    out = tmp_path / "eval"
    E.main(["--questions", str(world / "questions_eval.jsonl"), "--data", str(world), "--ckpt", str(tiny_dir),
            "--out", str(out), "--report", str(out / "report.html"), "--max_turns", "2", "--max_new_tokens", "8",
            "--no_progress"])
    printed = capsys.readouterr().out
    assert "| Mode | synthetic | Avg |" in printed and "RAG workflow" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]["synthetic"]) == {"direct", "rag", "agent"}
    assert metrics["results"]["synthetic"]["rag"]["searched"] == 1.0
    assert (out / "table.md").read_text() in printed
    assert len(T.read_jsonl(out / "trajectories.jsonl")) == 3 * 4
    assert (out / "report.html").read_text().count("<details class=") == 3 * 4


def test_compare_builds_the_pipeline_table(tiny_dir, world, tmp_path, capsys):
    out = tmp_path / "cmp"
    E.main(["--compare", str(tiny_dir), str(tiny_dir), "--questions", str(world / "questions_eval.jsonl"),
            "--data", str(world), "--out", str(out), "--max_turns", "3", "--max_new_tokens", "8", "--no_progress"])
    table = (out / "compare.md").read_text()
    assert table in capsys.readouterr().out
    lines = [line for line in table.split("\n\n")[0].splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| Method | search-free (n=0) | image (n=0) | image + text (n=3) | multi-hop (n=1) | "
                               "search-required (n=4) | crop-needed (n=0) | all (n=4)")
    assert "RL - SFT agent, all 4 questions: +0.0 points" in table  # the same checkpoint twice
    assert [line.split(" | ")[0] for line in lines[1:]] == [
        "| Direct answer (SFT model, no search)", "| RAG workflow (SFT model: whole-image search, then text search)",
        "| SFT agent (on-demand search)", "| SFT+RL agent (on-demand search)"]
    assert "| 0.0 (0.00) |" in lines[1]  # direct never searches
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert rows[1][1]["search-required"]["searches_per_q"] == 1.75  # RAG: 2 searches, 1 without an image
    assert len(T.read_jsonl(out / "compare_trajectories.jsonl")) == 4 * 4
    usage = [line for line in table.splitlines() if line.startswith("| Direct answer | ")]
    assert usage == ["| Direct answer | 100.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 |"]
    assert (out / "curves.svg").read_text().startswith("<svg")


def test_compare_asks_the_judge_and_needs_a_checkpoint(tiny_dir, world, tmp_path, judge_server, monkeypatch, capsys):
    url, _ = judge_server
    args = ["--questions", str(world / "questions_eval.jsonl"), "--data", str(world), "--out", str(tmp_path / "cmp"),
            "--limit", "2", "--max_turns", "2", "--max_new_tokens", "4", "--no_progress", "--judge_url", url]
    with pytest.raises(SystemExit, match="no checkpoint at .*a nor at .*b"):
        E.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")] + args)
    judges, evaluate = [], E.evaluate
    monkeypatch.setattr(E, "evaluate", lambda *a, **kw: judges.append(kw["judge"]) or evaluate(*a, **kw))
    rows = E.main(["--compare", str(tiny_dir), str(tmp_path / "b")] + args)
    assert len(rows) == 3 and len(judges) == 3 and all(isinstance(j, E.Judge) for j in judges)
    out = capsys.readouterr()
    assert "skipping SFT+RL agent (on-demand search): no checkpoint at" in out.err
    assert "\njudge: " in out.out  # its tally, after the table


def test_tool_usage_classes():
    recs = [record(f"q{k}", "agent", 0.0, n_text=t, n_image=i, n_crop=c) for k, (t, i, c) in
            enumerate([(0, 0, 0), (2, 1, 0), (1, 0, 1), (0, 1, 0), (1, 0, 0), (3, 0, 0), (0, 0, 0), (0, 0, 2)])]
    assert E.metrics(recs)["usage"] == {"no search": 2 / 8, "text only": 2 / 8, "image only": 1 / 8, "image + text": 1 / 8,
                                  "crop": 2 / 8, "2+ text searches": 2 / 8}


def test_wasted_calls_are_results_no_later_action_used():
    def step(kind, arg, obs=None, error=False):
        return {"action": {"kind": kind, "arg": arg}, "obs": obs and {"text": obs, "error": error}}
    found = "<information>Dezek Rindir was founded in 1915. It is made by Dafith Tidot.</information>"
    rec = {"question": "When was this object founded?", "n_text": 3, "n_image": 1, "n_crop": 0, "steps": [
        step("img_search", "<img>", "<information>Dezek Rindir: an arrow.</information>"),  # used by the query
        step("text_search", "Dezek Rindir founding year", found),  # used by the answer
        step("text_search", "Dezek Rindir founding year", found),  # the same again: nothing new
        step("text_search", "Dezek Rindir maker", "<information>Search failed: timeout</information>", error=True),
        step("answer", "1915")]}
    assert E.wasted_calls(rec) == (4, 2)
    rec["steps"][-1] = step("answer", "1916")  # the fact read, then not written: that result went unused too
    assert E.wasted_calls(rec) == (4, 3)


def test_training_curves_from_the_logs(tmp_path):
    import xml.etree.ElementTree as ET
    sft, rl = tmp_path / "sft", tmp_path / "rl"
    sft.mkdir(), rl.mkdir()
    (sft / "log.txt").write_text("config {}\n" + "".join(
        f"step {i}/20 | epoch 0.10 | loss {2 / i:.4f} | lr 1e-4 | tok/s 5000\n" for i in range(1, 21))
        + "eval step 10 | loss 0.5 | trajectories 8 | agent_acc 0.25 (n=4)\n"
        + "eval step 20 | loss 0.25 | trajectories 8 | agent_acc 0.5 (n=4)\n")
    (rl / "log.txt").write_text("step    1 | reward 0.2 | acc 0.1 | search/q text 0.50 img 0.25 crop 0.25 | tok/s roll 9\n"
                                "step    2 | reward 0.4 | acc 0.3 | search/q text 1.00 img 0.00 crop 0.50 | tok/s roll 9\n")
    assert E.log_series(sft / "log.txt")["loss"][:2] == [(1, 2.0), (2, 1.0)]
    assert E.log_series(sft / "log.txt", "eval step ")["agent_acc"] == [(10, 0.25), (20, 0.5)]
    assert E.log_series(rl / "log.txt")["search/q"] == [(1, 1.0), (2, 1.5)]  # searches of all kinds per question
    svg = ET.fromstring(E.pipeline_curves(sft, rl))
    lines = [e for e in svg.iter() if e.tag.endswith("polyline")]
    assert len(lines) == 4 + 6  # an axis per panel, 6 series
    assert len([e for e in svg.iter() if e.tag.endswith("circle")]) == 2 + 2 + 2 + 2 + 2  # short series get dots
    assert ET.fromstring(E.pipeline_curves(tmp_path / "none", tmp_path / "none")) is not None  # no logs: empty panels


def test_paired_bootstrap_interval():
    assert E.paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0]) == (0.0, 0.0, 0.0)
    a, b = [0] * 50 + [1] * 50, [1] * 100  # b wins 50 questions, loses none
    mean, lo, hi = E.paired_bootstrap(a, b)
    assert mean == 0.5 and 0.35 < lo < 0.5 < hi < 0.65
    assert E.paired_bootstrap(a, b) == (mean, lo, hi)  # seeded
    mixed = E.paired_bootstrap([0, 1] * 50, [1, 0] * 50)  # as many wins as losses: the interval spans 0
    assert mixed[0] == 0.0 and mixed[1] < 0 < mixed[2]


def test_bad_question_rows_are_skipped_and_named(tmp_path):
    import warnings
    from conftest import write_bad_questions, write_world
    d = write_world(tmp_path)
    path, kept, refused = write_bad_questions(d, T.read_jsonl(d / "rl.jsonl"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rows = T.load_questions(path)
    assert [r["id"] for r in rows] == kept
    assert all(isinstance(a, str) for r in rows for a in r["answers"])
    messages = [str(x.message) for x in w]
    assert len(messages) == len(refused) + 3 and all(f"{path}:" in m for m in messages)  # + not json, [1, 2], bad UTF-8
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no usable question"):
        T.load_questions(path)


def test_bad_images_and_fields_cost_their_question_not_the_run(tiny_dir, tmp_path):
    import warnings
    from conftest import write_bad_questions, write_world
    d = write_world(tmp_path)
    path, kept, _ = write_bad_questions(d, T.read_jsonl(d / "rl.jsonl"))
    out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        E.main(["--questions", str(path), "--data", str(d), "--ckpt", str(tiny_dir), "--out", str(out),
                "--modes", "agent", "--max_turns", "2", "--max_new_tokens", "6", "--no_progress"])
    recs = {r["qid"]: r for r in T.read_jsonl(out / "trajectories.jsonl")}
    assert sorted(recs) == sorted(kept)
    assert all(recs[i]["finish"] == "error" for i in ("b_img", "b_trunc", "b_text", "b_thin"))
    assert all(recs[i]["finish"] != "error" for i in kept if not i.startswith("b_"))


def test_a_file_with_no_usable_question_stops_before_loading_a_model(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(SystemExit, match="no usable question"):
        E.main(["--questions", str(tmp_path / "q.jsonl"), "--ckpt", str(tmp_path / "no_such_ckpt")])
