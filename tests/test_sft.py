"""sft.py: loss masking, overfitting, DDP == one process, exact resume, bad lines, lazy rendering, non-finite steps.

    timeout 900 python3 -m pytest -q tests/test_sft.py
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import model as M
import sft
import training

ROOT = Path(__file__).resolve().parent.parent
COLORS = ["red", "blue", "green", "orange", "purple", "gray"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and much faster on a busy machine (no OpenMP spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def conversation(k):
    """A two-turn tool-use trajectory about entity k with one image (or none when k % 3 == 2)."""
    name, year = f"Entity{k}", 1800 + 7 * k
    if k % 3 == 2:
        return [{"role": "user", "content": f"When was {name} founded?"},
                {"role": "assistant", "content": f"<reason>I know it.</reason><answer>{year}</answer>"}], 0
    return [{"role": "user", "content": "<image>\nWhen was this founded?"},
            {"role": "assistant", "content": "<reason>I need to identify it.</reason><img_search><img></img_search>"},
            {"role": "user", "content": f"<information>{name}: founded in {year}.</information>\nAnswer now."},
            {"role": "assistant", "content": f"<reason>It is {name}.</reason><answer>{year}</answer>"}], 1


def write_sft(folder, n, name="sft.jsonl"):
    """n trajectories with small PNGs of varied sizes, paths relative to the JSONL file."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        msgs, n_img = conversation(k)
        images = []
        if n_img:
            img = f"images/e{k}.png"
            Image.new("RGB", (28 * (1 + k % 3), 56), COLORS[k % len(COLORS)]).save(folder / img)
            images.append(img)
        rows.append({"id": f"t{k}", "images": images, "messages": msgs, "kind": "test"})
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def step_losses(log_file):
    """{step: loss} from a log.txt (a resumed run's later lines win, as they are the same steps)."""
    out = {}
    for line in Path(log_file).read_text().splitlines():
        m = re.match(r"step (\d+)/\d+ \| epoch \S+ \| loss (\S+) \|", line)
        if m:
            out[int(m.group(1))] = float(m.group(2))
    return out


def common(tiny_dir, data, out, *extra):
    return ["--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--eval_n", "0",
            "--agent_eval_n", "0", "--save_every", "0", *extra]


def test_bf16_keeps_fp32_masters_so_small_updates_land(tiny_dir, tmp_path):
    """Full fine-tuning in bf16 compute at LR 1e-6: the optimizer steps fp32 weights, so one step
    changes nearly every weight (stepping bf16 weights would round most updates away)."""
    data = write_sft(tmp_path, 8)
    sft.main(common(tiny_dir, data, tmp_path / "o", "--precision", "bf16", "--lr", "1e-6", "--warmup_ratio", "0",
                    "--max_steps", "1", "--batch_size", "4", "--micro_batch", "2"))
    assert "compute torch.bfloat16" in (tmp_path / "o" / "log.txt").read_text()
    state = torch.load(tmp_path / "o" / training.TRAIN_STATE, weights_only=False)["optimizer"]["state"]
    assert {v["exp_avg"].dtype for v in state.values()} == {torch.float32}
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "o" / "model.safetensors")
    trained = [k for k in a if not k.startswith("visual.")]  # the vision tower is frozen by default
    changed = sum((a[k].float() != b[k]).sum().item() for k in trained)
    assert changed / sum(a[k].numel() for k in trained) > 0.9


def test_masked_tokens_get_zero_gradient(tiny):
    model, proc = tiny
    msgs, _ = conversation(0)
    r = M.render(proc, msgs, [Image.new("RGB", (56, 56), "red")])
    r2 = M.render(proc, conversation(2)[0], [])
    batch = M.collate([r, r2], proc)
    captured = {}

    def keep(mod, inp, out):  # the final hidden states (B, T, D), the only input of lm_head
        out.retain_grad()
        captured["h"] = out

    hook = model.model.language_model.norm.register_forward_hook(keep)
    try:
        logp = training.wrap(model, "none")(batch)  # (B, T)
        n_tok = int(batch["loss_mask"].sum())
        loss, nll = sft.micro_loss(logp, batch["loss_mask"], n_tok, world=1)
        loss.backward()
    finally:
        hook.remove()
    g = captured["h"].grad  # (B, T, D); position t-1 predicts token t
    predicts_trained = torch.zeros_like(batch["loss_mask"], dtype=torch.bool)
    predicts_trained[:, :-1] = batch["loss_mask"][:, 1:].bool()
    assert g[~predicts_trained].abs().max().item() == 0.0  # masked (and padded) targets: no gradient at all
    assert (g[predicts_trained].abs().sum(-1) > 0).all()
    # The loss is the mean NLL of the trained tokens, computed here from the full logits.
    with torch.no_grad():
        logits = M.policy_logits(model.lm_head, captured["h"], model.config)  # (B, T, V) as sampled
        targets = batch["input_ids"][:, 1:].masked_fill(batch["loss_mask"][:, 1:] == 0, -100)
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert abs(loss.item() - ref.item()) < 1e-5
    model.zero_grad(set_to_none=True)


def test_epoch_plan_is_a_deterministic_partition():
    lengths = [5, 80, 12, 40, 33, 7, 61, 19, 24, 50, 3]
    a = sft.epoch_batches(len(lengths), 4, epoch=0, seed=1)
    assert a == sft.epoch_batches(len(lengths), 4, epoch=0, seed=1)
    assert a != sft.epoch_batches(len(lengths), 4, epoch=1, seed=1)
    flat = [j for b in a for j in b]
    assert len(a) == 2 and len(flat) == len(set(flat)) == 8  # 11 // 4 full batches, no repeats
    for b in a:  # the ranks' micro-batches partition the global batch
        parts = [sft.micro_batches(b, lengths, 1, r, 2) for r in range(2)]
        assert sorted(j for p in parts for mb in p for j in mb) == sorted(b)
        assert all(len(p) == 2 for p in parts)


def test_bad_lines_reported_and_skipped_or_fatal(tiny, tmp_path):
    _, proc = tiny
    path = write_sft(tmp_path, 3)
    good = path.read_text().splitlines()
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    truncated_png(tmp_path / "images" / "truncated.png")
    row = json.loads(good[0])
    bad = [
        "{not json",
        json.dumps({"id": "x", "images": []}),  # no messages
        json.dumps(dict(row, images=["images/missing.png"])),
        json.dumps(dict(row, images=["images/broken.png"])),
        json.dumps(dict(row, images=[])),  # one <image> placeholder, no image
        json.dumps(dict(row, images=["images/truncated.png"])),  # fails only when decoded
    ]
    path.write_bytes(("\n".join(good[:1] + bad) + "\n").encode() + b'{"id": "\xff"}\n' +
                     ("\n".join(good[1:]) + "\n").encode())
    lines = []
    items = sft.load_sft(path, proc, log=lines.append)
    assert [x["id"] for x in items] == ["t0", "t1", "t2"]
    for lineno, why in zip(range(2, 9), ["not valid JSON", "missing field 'messages'", "image not found",
                                         "corrupt image", "1 <image> placeholders but 0 images", "corrupt image",
                                         "not valid UTF-8"]):
        assert any(ln.startswith(f"{path}:{lineno}: skipped: ") and why in ln for ln in lines), (lineno, lines)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON")):
        sft.load_sft(path, proc, strict=True, log=lines.append)


def truncated_png(path):
    """A PNG whose header is fine (Image.open reads its size) but whose pixel data is cut short."""
    noise = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(noise.numpy()).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    with Image.open(path) as im:
        assert im.size == (64, 64)


def test_scanned_lengths_equal_render(tiny, tmp_path):
    """The scan counts tokens from the images' sizes only (render decodes and resizes them) and keeps
    small records: no tensors, images or token lists."""
    _, proc = tiny
    (tmp_path / "images").mkdir()
    sizes = [(300, 500), (20, 20), (56, 140), (200, 28), (57, 85)]  # shrunk, grown, kept, elongated, rounded
    for k, wh in enumerate(sizes):
        Image.new("RGB", wh, COLORS[k]).save(tmp_path / "images" / f"s{k}.png")
    rows = []
    for k in range(3):
        names = [f"images/s{(k + i) % len(sizes)}.png" for i in range(k + 1)]  # 1, 2 and 3 images
        msgs = [{"role": "user", "content": "<image>" * len(names) + "\nWhat are these?"},
                {"role": "assistant", "content": f"<reason>Shapes.</reason><answer>{k}</answer>"}]
        rows.append({"id": f"m{k}", "images": names, "messages": msgs})
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = sft.load_sft(path, proc, log=lambda s: None)
    assert [x["id"] for x in items] == ["m0", "m1", "m2"]
    for x, row in zip(items, rows):
        assert all(isinstance(v, (str, int)) for v in x.values()), x
        r = M.render(proc, row["messages"], [Image.open(tmp_path / p) for p in row["images"]])
        assert (x["length"], x["n_trained"]) == (len(r["input_ids"]), int(r["loss_mask"].sum()))
        lazy = sft.render_item(x, proc)
        assert torch.equal(lazy["input_ids"], r["input_ids"]) and torch.equal(lazy["pixel_values"], r["pixel_values"])


def test_changed_data_change_fingerprint_and_stop_rendering(tiny, tmp_path):
    _, proc = tiny
    path = write_sft(tmp_path, 3)
    items = sft.load_sft(path, proc, log=lambda s: None)
    Image.new("RGB", (28, 56), "black").save(tmp_path / "images" / "e0.png")  # same size, other pixels
    again = sft.load_sft(path, proc, log=lambda s: None)
    assert [x["length"] for x in again] == [x["length"] for x in items]
    assert sft.data_fingerprint(again) != sft.data_fingerprint(items)
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: the line or its images changed")):
        sft.render_item(items[0], proc)


def test_strict_flag_is_fatal(tiny_dir, tmp_path):
    path = write_sft(tmp_path, 4)
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(SystemExit, match=re.escape(f"{path}:5:")):
        sft.main(common(tiny_dir, path, tmp_path / "out", "--strict", "--batch_size", "2", "--micro_batch", "1"))


def test_one_example_overfits(tiny_dir, tmp_path):
    path = write_sft(tmp_path, 1)
    res = sft.main(common(tiny_dir, path, tmp_path / "out", "--batch_size", "1", "--micro_batch", "1",
                          "--epochs", "45", "--lr", "3e-3", "--warmup_ratio", "0", "--min_lr_ratio", "1"))
    assert res["losses"][0] > 3.0 and res["losses"][-1] < 0.05, res["losses"][::10]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "log.txt").is_file()
    M.load(tmp_path / "out", log=None)  # the checkpoint loads like any other


DIST_ARGS = ["--batch_size", "4", "--micro_batch", "1", "--epochs", "2"]  # 8 trajectories: 4 steps


@pytest.fixture(scope="module")
def one_process(tiny_dir, tmp_path_factory):
    """The reference: one process, accumulation 4. The vision tower trains, and text-only
    micro-batches leave it unused, which DDP must handle. Line 4 has an image that is corrupt only
    when decoded: every rank must skip it, or the ranks' batches would differ."""
    folder = tmp_path_factory.mktemp("dist")
    path = write_sft(folder, 8)
    lines = path.read_text().splitlines(keepends=True)
    truncated_png(folder / "images" / "truncated.png")
    bad = dict(json.loads(lines[0]), images=["images/truncated.png"])
    path.write_text("".join(lines[:3]) + json.dumps(bad) + "\n" + "".join(lines[3:]))
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as fast as it gets for a tiny model, like the autouse fixture
    res = sft.main(common(tiny_dir, path, folder / "one", *DIST_ARGS))
    torch.set_num_threads(n)
    return folder, path, res["losses"], load_file(folder / "one" / "model.safetensors")


def torchrun2(tiny_dir, path, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_entry.py"), "sft", *common(tiny_dir, path, out, *DIST_ARGS, *extra)]
    p = subprocess.run(cmd, cwd=out.parent, env=dict(os.environ, OMP_NUM_THREADS="1", WATCHDOG_S="150"),
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-60000:]  # a hang: every rank's watchdog stacks


def assert_same_run(out, losses, weights):
    got = step_losses(out / "log.txt")
    assert sorted(got) == list(range(1, len(losses) + 1))
    for s, loss in enumerate(losses, 1):
        assert abs(got[s] - loss) < 1e-5, (s, got[s], loss)
    w = load_file(out / "model.safetensors")
    assert w.keys() == weights.keys()
    assert max((w[k] - weights[k]).abs().max().item() for k in w) < 1e-5


def test_ddp_two_processes_equal_one(tiny_dir, one_process):
    folder, path, losses, weights = one_process
    torchrun2(tiny_dir, path, folder / "ddp")
    text = (folder / "ddp" / "log.txt").read_text()
    assert "world 2 (ddp)" in text and "global batch 4 = micro 1 x accum 2 x world 2" in text
    assert f"{path}:4: skipped: corrupt image" in text  # scanned by rank 1, known to both
    assert_same_run(folder / "ddp", losses, weights)


def test_fsdp_two_processes_stopped_and_resumed_equal_one(tiny_dir, one_process):
    folder, path, losses, weights = one_process
    torchrun2(tiny_dir, path, folder / "fsdp", "--fsdp", "--stop_after_steps", "2")
    assert json.loads((folder / "fsdp" / "meta.json").read_text())["step"] == 2
    torchrun2(tiny_dir, path, folder / "fsdp", "--fsdp", "--resume")
    assert "resuming at step 2" in (folder / "fsdp" / "log.txt").read_text()
    assert_same_run(folder / "fsdp", losses, weights)  # gathered from shards, tied lm_head stored once


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_matches_uninterrupted(tiny_dir, tmp_path, mode):
    path = write_sft(tmp_path, 8)
    args = ["--batch_size", "2", "--micro_batch", "1", "--epochs", "2", "--eval_every", "4",
            *(["--lora_rank", "4", "--lr", "1e-2"] if mode == "lora" else [])]
    straight = sft.main(common(tiny_dir, path, tmp_path / "a", *args))
    first = sft.main(common(tiny_dir, path, tmp_path / "b", *args, "--stop_after_steps", "3"))
    assert first["step"] == 3
    rest = sft.main(common(tiny_dir, path, tmp_path / "b", *args, "--resume"))
    assert len(straight["losses"]) == 8 and first["losses"] + rest["losses"] == straight["losses"]
    assert rest["eval_loss"] == straight["eval_loss"] is None  # eval_n 0: no held-out set
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(tmp_path / "b" / "log.txt") == step_losses(tmp_path / "a" / "log.txt")


def test_nonfinite_steps_skipped_then_abort_keeps_checkpoint(tiny_dir, tmp_path, monkeypatch):
    path = write_sft(tmp_path, 4)
    calls = {"n": 0}
    real = sft.micro_loss

    def poisoned(logp, mask, n_tokens, world):  # micro-batches from step 3 on give a NaN loss
        calls["n"] += 1
        loss, nll = real(logp, mask, n_tokens, world)
        return (loss * float("nan"), nll * float("nan")) if calls["n"] > 4 else (loss, nll)

    monkeypatch.setattr(sft, "micro_loss", poisoned)
    out = tmp_path / "out"
    args = common(tiny_dir, path, out, "--batch_size", "2", "--micro_batch", "1", "--epochs", "5",
                  "--max_bad_steps", "2") + ["--save_every", "1"]
    with pytest.raises(SystemExit, match=r"2 non-finite steps in a row .* at step 4: .*\(step 2\), untouched"):
        sft.main(args)
    assert json.loads((out / "meta.json").read_text())["step"] == 2
    assert (out / training.TRAIN_STATE).is_file() and (out / "log.txt").is_file()
    lines = (out / "log.txt").read_text()
    assert "loss nan" in lines and "skipped 1" in lines and "skipped 2" in lines
    w = load_file(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())
