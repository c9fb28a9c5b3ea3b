"""training.py checkpoints: one atomic unit under a kill at any step, LoRA adapters in PEFT's layout,
merged weights in fp32, the adapters-off reference."""
import importlib.util
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import model as M
import training
from tests.conftest import ROOT, icon

CONV = [{"role": "user", "content": "<image>\nWhat is this?"},
        {"role": "assistant", "content": "<reason>A disc.</reason><answer>red disc</answer>"}]


def _batch(proc):
    return M.collate([M.render(proc, CONV, [icon("red")])], proc)


def _unit(out):
    """(meta step, train-state step, one weight) of the checkpoint in `out`."""
    meta = json.loads((out / "meta.json").read_text())["step"]
    state = torch.load(out / training.TRAIN_STATE, weights_only=False)["step"]
    w = load_file(out / "model.safetensors")["model.norm.weight"]
    return meta, state, w


class Killed(BaseException):
    pass


def test_kill_at_any_step_of_a_save_leaves_one_complete_unit(tiny_dir, tmp_path, monkeypatch):
    """A kill -9 between any two file operations of save (simulated: the k-th rename or write
    raises and nothing is cleaned up), then recover(): the old unit or the new one, never a mix,
    and the run's log survives."""
    model, proc = M.load(tiny_dir, log=None)
    opt = torch.optim.AdamW(model.parameters())
    real_replace, real_save = os.replace, torch.save
    n_ops = None
    for k in range(20):
        out = tmp_path / f"run{k}" / "ck"
        with torch.no_grad():
            model.model.language_model.norm.weight.fill_(1.0)
        training.save_checkpoint(model, proc, out, {}, opt, step=1)
        (out / "log.txt").write_text("line one\n")
        with torch.no_grad():
            model.model.language_model.norm.weight.fill_(2.0)
        calls = []

        def op(real):
            def f(*a, **kw):
                calls.append(1)
                if len(calls) == k + 1:
                    raise Killed
                return real(*a, **kw)
            return f
        monkeypatch.setattr(training.os, "replace", op(real_replace))
        monkeypatch.setattr(training.torch, "save", op(real_save))
        monkeypatch.setattr(training.shutil, "rmtree", lambda *a, **kw: None)  # a killed process cleans nothing
        try:
            training.save_checkpoint(model, proc, out, {}, opt, step=2)
            finished = True
        except Killed:
            finished = False
        monkeypatch.undo()
        training.recover(out)
        meta, state, w = _unit(out)
        assert meta == state and w.eq(float(meta)).all(), (k, meta, state)
        assert (out / "log.txt").read_text() == "line one\n", k
        assert not list(out.parent.glob(".ck.*")), k  # nothing left over
        if finished:
            n_ops = k
            break
    assert n_ops is not None and n_ops >= 4  # every step of the save was interrupted once


def test_lora_checkpoint_has_a_peft_adapter_and_fp32_merged_weights(tiny_dir, tmp_path):
    model, proc = M.load(tiny_dir, dtype=torch.bfloat16, log=None)  # a bf16 base, as on a GPU
    training.add_lora(model, rank=4, alpha=8)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 1e-3)  # a small delta: bf16 merged weights would round most of it away
    out = training.save_checkpoint(model, proc, tmp_path / "ck", {"base": str(tiny_dir)})
    cfg = json.loads((out / training.ADAPTER_DIR / training.ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    adapter = load_file(out / training.ADAPTER_DIR / training.ADAPTER_FILE)
    assert all(k.startswith("base_model.model.model.language_model.layers.") and
               k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapter)
    merged = load_file(out / "model.safetensors")
    assert {v.dtype for v in merged.values() if v.is_floating_point()} == {torch.float32}
    q = model.model.language_model.layers[0].self_attn.q_proj
    exact = q.base.weight.float() + (q.lora_B @ q.lora_A) * q.scale
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], exact.detach())
    # base + adapter reproduces the trained model exactly
    again, _ = M.load(tiny_dir, dtype=torch.bfloat16, log=None)
    training.add_lora(again, rank=4, alpha=8)
    training.load_adapter(again, out)
    b = _batch(proc)
    with torch.no_grad():
        assert torch.equal(M.token_logprobs(model, b), M.token_logprobs(again, b))


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="pip install --no-deps -r requirements-test.txt")
def test_peft_users_get_the_trained_model_both_ways(tiny_dir, tmp_path):
    """PEFT on the base + our adapter, and transformers on the merged folder (which, with peft
    installed, attaches an adapter_config.json it finds beside config.json: the LoRA twice)."""
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration
    model, proc = M.load(tiny_dir, log=None)
    training.add_lora(model, rank=4, alpha=8)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    out = training.save_checkpoint(model, proc, tmp_path / "ck", {"base": str(tiny_dir)})
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / training.ADAPTER_DIR).eval()
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    b = _batch(proc)
    with torch.no_grad():
        ours = M.token_logprobs(model, b)
        assert torch.allclose(ours, M.token_logprobs(peft_model.base_model.model, b), atol=1e-5)
        assert torch.allclose(ours, M.token_logprobs(merged, b), atol=1e-5)


def test_lora_disabled_is_the_base_model(tiny_dir):
    model, proc = M.load(tiny_dir, log=None)
    b = _batch(proc)
    with torch.no_grad():
        base = M.token_logprobs(model, b)
        training.add_lora(model, rank=4, alpha=8)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
        with training.lora_disabled(model):
            off = M.token_logprobs(model, b)
        on = M.token_logprobs(model, b)
    assert torch.equal(off, base) and not torch.allclose(on, base)


def test_reduce_in_one_process_is_the_identity():
    assert M.reduce([1, 2.5]) == [1.0, 2.5] and M.reduce([3], op="max") == [3.0]


def _kill_then_resume(cmd, log, rng, kills=3):
    """Start `cmd --resume` and kill -9 it at a random moment after it has logged 1-3 new steps (so
    inside a step or a save: every step saves), `kills` times; then let a last launch finish.
    Returns how many launches were killed while still running."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = 0
    for _ in range(kills):
        seen = log.read_text().count("\nstep") if log.is_file() else 0
        want, t0 = seen + rng.randint(1, 3), time.time()
        p = subprocess.Popen(cmd + ["--resume"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None and time.time() - t0 < 120 and \
                (log.read_text().count("\nstep") if log.is_file() else 0) < want:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))
        killed += p.poll() is None
        p.kill()
        p.wait()
    p = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return killed


def _step_lines(log):
    """{step: its log line up to its timings}: a step logged again after a resume must read the same."""
    out = {}
    for line in log.read_text().splitlines():
        if line.startswith("step"):
            key, line = line.split("|")[0].split("/")[0], line.split("| tok/s")[0]
            assert out.setdefault(key, line) == line, line
    return out


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_kill_9_at_random_moments_then_resume_equals_unbroken(tiny_dir, tmp_path, stage):
    """Real kills (SIGKILL at seeded random moments; every step saves, so a kill may land inside a save),
    each followed by --resume: the same step lines and the same final weights as a run never killed."""
    from tests.conftest import write_world
    from tests.test_sft import common, write_sft
    if stage == "sft":
        data = write_sft(tmp_path, 24)
        def cmd(out):
            return [sys.executable, str(ROOT / "sft.py"), *common(tiny_dir, data, out, "--max_steps", "30",
                    "--batch_size", "4", "--micro_batch", "2", "--save_every", "1", "--threads", "1")]
    else:
        d = write_world(tmp_path)
        def cmd(out):
            return [sys.executable, str(ROOT / "tests" / "dist_entry.py"), "rl", "--ckpt", str(tiny_dir), "--data", str(d),
                    "--out", str(out), "--steps", "8", "--batch", "2", "--group", "2", "--mini_batch", "2",
                    "--max_turns", "2", "--max_new_tokens", "6", "--save_every", "1", "--lr", "1e-3", "--threads", "1"]
    subprocess.run(cmd(tmp_path / "a"), check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    killed = _kill_then_resume(cmd(tmp_path / "b"), tmp_path / "b" / "log.txt", random.Random(0))
    a, b = _step_lines(tmp_path / "a" / "log.txt"), _step_lines(tmp_path / "b" / "log.txt")
    launches = sum(line.startswith("# {") for line in (tmp_path / "b" / "log.txt").read_text().splitlines())
    print(f"{stage}: {killed} of 3 launches killed while running, {launches} launches logged")
    assert killed == 3 and launches == 4
    assert a == b
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
