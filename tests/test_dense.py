"""Dense retrieval (search.py index, Encoder, DenseIndex) with tiny CLIP / SigLIP / BERT folders
built in the test (tests/encoders.py).

    python -m pytest -q tests/test_dense.py
"""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import search as S
import serve
import tools as T
from conftest import ROOT
from encoders import colour_clip, tiny_bert, tiny_siglip

HUES = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30), (220, 30, 220), (30, 220, 220),
        (240, 140, 30), (120, 30, 200)]
CORPUS = [{"id": f"d{i}", "title": title, "text": text, "url": f"https://x/{i}"} for i, (title, text) in enumerate([
    ("red tower", "the old red tower of the city"), ("blue river", "a blue river in the city"),
    ("green bridge", "the new green bridge on the river"), ("yellow cat", "a photo of a yellow cat"),
    ("old dog", "the dog of the tower"), ("new city", "a new city on a river")])]


def photos(folder, n=len(HUES), seed=0):
    """Noisy photos, one dominant colour each (PNG and JPEG), in a nested folder."""
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.clip(np.array(HUES[i % len(HUES)]) + rng.normal(0, 25, (60, 80, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / ("sub" if i % 2 else ".") / f"p{i}.{'jpg' if i % 3 == 0 else 'png'}")
    return folder


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    d = tmp_path_factory.mktemp("encoders")
    return {"clip": colour_clip(str(d / "clip")), "siglip": tiny_siglip(str(d / "siglip")),
            "bge": tiny_bert(str(d / "bge"), "cls"), "e5": tiny_bert(str(d / "e5"), "mean")}


def test_a_crop_of_an_indexed_photo_finds_that_photo_first(tmp_path, encoders):
    S.build_index(str(photos(tmp_path / "photos")), encoders["clip"], str(tmp_path / "idx"), progress=False)
    T.write_jsonl(tmp_path / "data" / "corpus.jsonl", CORPUS)  # text stays BM25; data/ has no image_index.jsonl
    tools = S.make_tools(str(tmp_path / "data"), image_index=str(tmp_path / "idx"))
    for i in range(len(HUES)):
        path = next((tmp_path / "photos").rglob(f"p{i}.*"))
        with Image.open(path) as image:
            scene = image.convert("RGB")
        obs = tools.execute(T.parse_action("<reason>r</reason><img_search>[20, 10, 60, 50]</img_search>"), scene,
                            T.State())
        assert not obs.error and obs.results[0]["id"] == str(path.relative_to(tmp_path / "photos")), obs.text


def test_siglip_whole_image_and_text_to_image_search(tmp_path, encoders):
    folder = photos(tmp_path / "photos", n=6)
    meta = S.build_index(str(folder), encoders["siglip"], str(tmp_path / "idx"), progress=False)
    index = S.DenseIndex(str(tmp_path / "idx"))
    assert meta["count"] == 6 and index.matrix.shape == (6, 8)
    with Image.open(folder / "sub" / "p3.jpg") as image:
        hit = index.search(image, 2)
    assert hit[0]["id"] == "sub/p3.jpg" and hit[0]["score"] == pytest.approx(1.0, abs=1e-5)
    text_hits = index.search("a red photo", 3)  # SigLIP's text tower, padded to max_length as it was trained
    assert len(text_hits) == 3 and all(-1 <= h["score"] <= 1 for h in text_hits)
    assert index.encoder.pad == "max_length"


def test_index_build_resumes_where_it_was_interrupted(tmp_path, encoders, monkeypatch):
    folder = str(photos(tmp_path / "photos", n=7))
    embedded = []
    real = S._embed_rows

    def interrupted(encoder, rows, *a):
        if len(embedded) == 2:
            raise KeyboardInterrupt  # as a kill would, between two parts
        embedded.append(len(rows))
        return real(encoder, rows, *a)

    monkeypatch.setattr(S, "_embed_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        S.build_index(folder, encoders["clip"], str(tmp_path / "idx"), part_size=2, progress=False)
    with pytest.raises(FileNotFoundError, match="interrupted"):
        S.DenseIndex(str(tmp_path / "idx"))
    embedded.append(None)  # let it run now
    monkeypatch.setattr(S, "_embed_rows", lambda *a: embedded.append(len(a[1])) or real(*a))
    S.build_index(folder, encoders["clip"], str(tmp_path / "idx"), part_size=2, progress=False)
    assert embedded == [2, 2, None, 2, 1]  # the two saved parts were not embedded again
    # the same parts uninterrupted: a batch's matmuls may round differently at another batch size
    S.build_index(folder, encoders["clip"], str(tmp_path / "fresh"), part_size=2, progress=False)
    resumed = np.load(tmp_path / "idx" / "embeddings.npy")
    np.testing.assert_array_equal(resumed, np.load(tmp_path / "fresh" / "embeddings.npy"))
    assert not (tmp_path / "idx" / "parts").exists()


def test_an_unreadable_image_is_left_out_and_named(tmp_path, encoders):
    folder = photos(tmp_path / "photos", n=3)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning, match="broken.png"):
        meta = S.build_index(str(folder), encoders["clip"], str(tmp_path / "idx"), progress=False)
    assert meta["count"] == 3 and meta["left_out"] == ["broken.png"]
    assert [r["id"] for r in T.read_jsonl(tmp_path / "idx" / "rows.jsonl")] == ["p0.jpg", "p2.png", "sub/p1.png"]


def test_another_input_into_a_built_index_folder_is_refused(tmp_path, encoders):
    S.build_index(str(photos(tmp_path / "a", n=2)), encoders["clip"], str(tmp_path / "idx"), progress=False)
    with pytest.raises(ValueError, match="another input"):
        S.build_index(str(photos(tmp_path / "b", n=3)), encoders["clip"], str(tmp_path / "idx"), progress=False)


def test_text_encoders_pool_as_their_folder_declares(tmp_path, encoders):
    texts = ["the red tower", "a photo of a cat on the bridge"]
    for name, pooling in (("bge", "cls"), ("e5", "mean")):
        encoder = S.Encoder(encoders[name])
        assert encoder.pooling == pooling
        tokens = encoder.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        pooled = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
        expected = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        np.testing.assert_allclose(encoder.embed(texts), expected, atol=1e-6)


def test_dense_text_search_with_prefixes_and_over_the_searchr1_protocol(tmp_path, encoders):
    T.write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    S.build_index(str(tmp_path / "corpus.jsonl"), encoders["e5"], str(tmp_path / "idx"), progress=False,
                  query_prefix="query: ", passage_prefix="query: ")  # the same prefix: a document's own text finds it
    index = S.DenseIndex(str(tmp_path / "idx"))
    assert index.meta["kind"] == "text"
    for doc in CORPUS:
        assert index.search(f"{doc['title']}\n{doc['text']}", 1)[0]["id"] == doc["id"]
    server = serve.SearchServer(index, None, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got = S.SearchR1TextSearch(f"http://127.0.0.1:{server.server_port}/retrieve").search("blue river\na blue river in the city", 2)
    finally:
        server.shutdown()
        server.server_close()
    assert got[0]["id"] == "d1" and got[0]["title"] == "blue river" and len(got) == 2


def test_an_index_refuses_an_encoder_that_changed(tmp_path, encoders):
    encoder = tiny_bert(str(tmp_path / "enc"))
    T.write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    S.build_index(str(tmp_path / "corpus.jsonl"), encoder, str(tmp_path / "idx"), progress=False)
    colour_clip(encoder)  # another checkpoint now sits where the index's encoder was
    with pytest.raises(ValueError, match="not the one"):
        S.DenseIndex(str(tmp_path / "idx"))


def test_index_command_line(tmp_path, encoders):
    folder = photos(tmp_path / "photos", n=4)
    cmd = [sys.executable, str(ROOT / "search.py"), "index", str(folder), "--encoder", encoders["clip"],
           "--out", str(tmp_path / "idx"), "--batch_size", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "4 images x 6 dims" in done.stdout, done.stdout + done.stderr
    assert "up to date" in subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_index_command_resumes_after_kill_9(tmp_path, encoders):
    folder = photos(tmp_path / "photos", n=160)
    cmd = [sys.executable, str(ROOT / "search.py"), "index", str(folder), "--encoder", encoders["clip"],
           "--out", str(tmp_path / "idx"), "--batch_size", "2", "--part_size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "idx" / "parts"
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline and len(list(parts.glob("*.npy"))) < 3:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if (tmp_path / "idx" / "index.json").exists():
        pytest.skip("the build finished before the kill")
    saved = len(list(parts.glob("*.npy")))
    subprocess.run(cmd, check=True, capture_output=True)
    S.build_index(str(folder), encoders["clip"], str(tmp_path / "fresh"), batch_size=2, part_size=2, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "idx" / "embeddings.npy"), np.load(tmp_path / "fresh" / "embeddings.npy"))
    assert saved >= 3 and T.read_jsonl(tmp_path / "idx" / "rows.jsonl") == T.read_jsonl(tmp_path / "fresh" / "rows.jsonl")
