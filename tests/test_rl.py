"""rl.py: advantages, the clipped surrogate and its masks, KL at the start, rewards, real steps and resumes.

    timeout 900 python3 -m pytest -q tests/test_rl.py
"""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import model as M
import rl
import rollout as R
import search as S
import tools as T
import training
from tests.conftest import write_bad_questions, write_world
from tests.dist_entry import token_reward

ROOT = Path(__file__).resolve().parent.parent


def step_lines(out):
    """The step lines of a run's log.txt up to their timings."""
    return [line.split("| tok/s")[0] for line in (out / "log.txt").read_text().splitlines() if line.startswith("step")]


def test_equal_rewards_give_exactly_zero_advantage_for_any_value():
    values = [0.0, 0.1, 0.9, 1.0, 1 / 3, 0.1 + 0.2, 0.9 * 0.7 + 0.1, 1e-7, 123.456]
    for g in (2, 3, 5, 8, 16):
        adv = rl.group_advantages([v for v in values for _ in range(g)], g)
        assert torch.equal(adv, torch.zeros(len(values) * g)), (g, adv.abs().max())
    adv = rl.group_advantages([0.1, 0.1, 1.0, 0.1], 4)  # the paper's R - mean(R)
    assert torch.allclose(adv, torch.tensor([-0.225, -0.225, 0.675, -0.225]))


def test_equal_rewards_give_zero_gradient(tiny_dir):
    # Through a real model: a group of equal rewards produces no gradient at all.
    model, proc = M.load(tiny_dir, log=None)
    b = M.collate([M.render(proc, [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "<answer>x</answer>"}])], proc)
    lp = M.token_logprobs(model, b)
    loss, _ = rl.grpo_loss(lp, lp.detach(), torch.zeros(1), b["loss_mask"])
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())


def test_masked_tokens_get_no_gradient():
    lp = torch.randn(2, 6, requires_grad=True)
    old = lp.detach() + 0.1 * torch.randn(2, 6)
    ref = lp.detach() + 0.1 * torch.randn(2, 6)
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 1, 1]])
    loss, _ = rl.grpo_loss(lp, old, torch.tensor([1.0, -0.5]), mask, ref_logprobs=ref, beta=0.1)
    loss.backward()
    assert (lp.grad[mask == 0] == 0).all() and (lp.grad[mask == 1] != 0).all()


def test_clipping_on_hand_made_ratios():
    ratios = torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.5]])
    old = torch.zeros(1, 5)
    lp = ratios.log().requires_grad_()
    mask = torch.ones(1, 5)
    # Positive advantage: min(r A, clip(r) A) = [0.5, 0.9, 1.0, 1.1, 1.2]; negative: [-0.8, -0.9, -1, -1.1, -1.5].
    loss, st = rl.grpo_loss(lp, old, torch.tensor([1.0]), mask, clip=0.2)
    assert torch.isclose(loss, -torch.tensor([0.5, 0.9, 1.0, 1.1, 1.2]).mean())
    assert st["clip_frac"] == 2
    loss.backward()
    assert lp.grad[0, 4] == 0 and lp.grad[0, 0] != 0  # clipped above with A > 0: no push further
    lp.grad = None
    loss, _ = rl.grpo_loss(lp, old, torch.tensor([-1.0]), mask, clip=0.2)
    assert torch.isclose(loss, torch.tensor([0.8, 0.9, 1.0, 1.1, 1.5]).mean())
    loss.backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 4] != 0


def test_first_minibatch_ratio_is_one_and_kl_zero(tiny_dir, tmp_path):
    d = write_world(tmp_path)
    model, proc = M.load(tiny_dir, log=None)
    ref, _ = M.load(tiny_dir, log=None)
    tools = S.make_tools(str(d))
    trajs = R.rollout(model, proc, tools, T.load_questions(d / "rl.jsonl")[:2], group_size=2,
                      temperature=1.0, seed=0, max_turns=2, max_new_tokens=8)
    b = M.collate([t.item() for t in trajs], proc, extra_keys=("logprobs",))
    model.train()
    lp = M.token_logprobs(model, b)
    with torch.no_grad():
        ref_lp = M.token_logprobs(ref, b)
    _, st = rl.grpo_loss(lp, b["logprobs"], torch.ones(4), b["loss_mask"], ref_logprobs=ref_lp, beta=0.1)
    assert abs(st["ratio"] / st["tokens"] - 1) < 1e-5
    assert abs(st["kl"]) < 1e-8 and st["clip_frac"] == 0


def _traj(finish, answer, kinds):
    t = R.Trajectory(qid="q", question={"question": "Capital?", "answers": ["Paris"]})
    t.finish, t.answer = finish, answer
    t.actions = [T.Action(kind=k, arg="") for k in kinds]
    return t


def test_rewards_of_malformed_empty_and_over_budget():
    assert rl.reward(_traj("answer", "paris", ["text_search", "answer"])) == 1.0
    assert abs(rl.reward(_traj("answer", "paris", ["invalid", "answer"])) - 0.9) < 1e-9  # a malformed turn
    assert rl.reward(_traj("answer", "", ["answer"])) == 0.1  # empty answer: no correctness
    assert rl.reward(_traj("answer", "Lyon", ["answer"])) == 0.1
    assert rl.reward(_traj("budget", None, ["text_search"] * 6)) == 0.0
    assert rl.reward(_traj("length", None, ["text_search"])) == 0.0
    assert rl.reward(_traj("error", None, [])) == 0.0


def test_step_prompts_resume_and_shard():
    qs = list(range(10))
    a = [rl.step_prompts(qs, s, 4, seed=1) for s in range(5)]
    assert a[3] == rl.step_prompts(qs, 3, 4, seed=1)
    assert sorted(a[0] + a[1] + rl.step_prompts(qs, 2, 4, seed=1)[:2]) == qs  # an epoch covers every prompt
    assert rl.step_prompts(qs, 2, 4, 1, rank=0, world=2) + rl.step_prompts(qs, 2, 4, 1, rank=1, world=2) \
        == a[2][0::2] + a[2][1::2]


def test_rl_runs_and_resumes_exactly(tiny_dir, tmp_path, monkeypatch):
    d = write_world(tmp_path)
    # An untrained model never answers, so every reward would be 0 and nothing would move: score
    # trajectories by a deterministic function of their tokens instead, to exercise real updates.
    monkeypatch.setattr(rl, "reward", token_reward)
    base = ["--ckpt", str(tiny_dir), "--data", str(d), "--batch", "2", "--group", "2", "--mini_batch", "2",
            "--max_turns", "2", "--max_new_tokens", "6", "--save_every", "1", "--lr", "1e-3", "--beta", "0.01"]
    rl.main(base + ["--out", str(tmp_path / "a"), "--steps", "2"])
    rl.main(base + ["--out", str(tmp_path / "b"), "--steps", "1"])
    rl.main(base + ["--out", str(tmp_path / "b"), "--steps", "2", "--resume"])
    a, b = step_lines(tmp_path / "a"), step_lines(tmp_path / "b")
    assert a == b and len(a) == 2  # same rewards, KL, entropy, grad norms
    assert "gnorm 0.00" not in a[0] and "kl 0.0000" not in a[1]  # the updates were real
    ma, _ = M.load(tmp_path / "a", log=None)
    mb, _ = M.load(tmp_path / "b", log=None)
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p, q), n


def test_shared_prompts_and_separate_forwards_give_the_same_step(tiny_dir, tmp_path, monkeypatch):
    d = write_world(tmp_path)
    monkeypatch.setattr(rl, "reward", token_reward)
    logs = {}
    for name, extra in (("shared", []), ("separate", ["--separate_forwards"])):
        rl.main(["--ckpt", str(tiny_dir), "--data", str(d), "--out", str(tmp_path / name), "--steps", "1",
                 "--batch", "2", "--group", "2", "--max_turns", "2", "--max_new_tokens", "6", *extra])
        logs[name] = (tmp_path / name / "log.txt").read_text()
    assert f"(text decoder {M.SHARED_ATTN})" in logs["shared"]
    assert "(text decoder sdpa_cpu_decode)" in logs["separate"]
    steps = [step_lines(tmp_path / name) for name in logs]
    assert steps[0] == steps[1] and len(steps[0]) == 1  # the same statistics, to print precision


def test_bench_runs_both_layouts_from_the_same_start(tiny_dir, tmp_path, monkeypatch):
    d = write_world(tmp_path)
    monkeypatch.setattr(rl, "reward", token_reward)
    times = rl.main(["--ckpt", str(tiny_dir), "--data", str(d), "--out", str(tmp_path / "b"), "--bench",
                     "--batch", "2", "--group", "2", "--max_turns", "2", "--max_new_tokens", "6"])
    assert set(times) == {"separate", "shared", "shared+features"} and min(times.values()) > 0
    log = (tmp_path / "b" / "log.txt").read_text()
    # 2 prompts x G=2, policy and reference: 8 images through a vision tower one by one, 4 shared, none
    # from the rollout's features (the rollout: each group's prompt image once, and any tool images)
    assert "images through the vision tower 8" in log and "images through the vision tower 4" in log
    assert re.search(r"shared\+features .* images through the vision tower 0$", log, re.M)
    assert int(re.search(r"(\d+) images through the vision tower in the rollout", log)[1]) >= 2
    assert not (tmp_path / "b" / "model.safetensors").exists()  # a bench writes no checkpoint


SMALL = ["--batch", "2", "--group", "2", "--mini_batch", "2", "--micro_batch", "1", "--max_turns", "2",
         "--max_new_tokens", "6", "--save_every", "1", "--beta", "0.01", "--precision", "bf16"]


def test_bf16_keeps_fp32_masters_so_small_updates_land(tiny_dir, tmp_path, monkeypatch):
    """At the paper's LR 2e-6, bf16 weights would round almost every update away; fp32 masters
    under bf16 compute change nearly all of them after one step."""
    d = write_world(tmp_path)
    monkeypatch.setattr(rl, "reward", token_reward)
    rl.main(["--ckpt", str(tiny_dir), "--data", str(d), "--out", str(tmp_path / "o"), "--steps", "1",
             *SMALL, "--lr", "2e-6", "--warmup", "1"])
    assert "compute torch.bfloat16" in (tmp_path / "o" / "log.txt").read_text()
    assert "(torch.float32)" in (tmp_path / "o" / "log.txt").read_text()  # the trainable parameters
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "o" / "model.safetensors")
    trained = [k for k in a if not k.startswith("visual.")]  # the vision tower is frozen by default
    assert all(torch.equal(a[k], b[k]) for k in a if k not in trained)
    changed = sum((a[k].float() != b[k]).sum().item() for k in trained)
    assert changed / sum(a[k].numel() for k in trained) > 0.9


def _torchrun_rl(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_entry.py"), "rl", *args]
    p = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-60000:]  # a hang: every rank's watchdog stacks


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_bf16_run_and_resume_exactly(tiny_dir, tmp_path, mode):
    """torchrun, 2 gloo ranks, bf16: the rollout runs on whole (for FSDP2: gathered) weights while
    ranks decode different lengths, the update syncs, and stop + --resume equals an unbroken run."""
    d = write_world(tmp_path)
    base = ["--ckpt", str(tiny_dir), "--data", str(d), *SMALL, "--lr", "1e-3"] + (["--fsdp"] if mode == "fsdp" else [])
    _torchrun_rl(*base, "--out", str(tmp_path / "a"), "--steps", "2")
    _torchrun_rl(*base, "--out", str(tmp_path / "b"), "--steps", "1")
    _torchrun_rl(*base, "--out", str(tmp_path / "b"), "--steps", "2", "--resume")
    a, b = step_lines(tmp_path / "a"), step_lines(tmp_path / "b")
    assert a == b and len(a) == 2 and "gnorm 0.00" not in a[0]
    assert f"on 2 rank(s) ({mode})" in (tmp_path / "a" / "log.txt").read_text()
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_prompts_cost_their_samples_not_the_run(tiny_dir, tmp_path, monkeypatch):
    """Unreadable or refused images end their samples as errors (no tokens, no gradient); rows with
    wrong fields are skipped at load; the step runs, logs the count and saves."""
    d = write_world(tmp_path)
    path, kept, _ = write_bad_questions(d, T.read_jsonl(d / "rl.jsonl"))
    monkeypatch.setattr(rl, "reward", token_reward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rl.main(["--ckpt", str(tiny_dir), "--data", str(d), "--prompts", str(path), "--out", str(tmp_path / "o"),
                 "--steps", "1", "--batch", str(len(kept)), *SMALL[2:]])
    log = (tmp_path / "o" / "log.txt").read_text()
    assert f"{len(kept)} RL prompts" in log and "| errors 8 |" in log  # 4 bad images x G = 2
    assert log.count(f"{path}:") == 7  # each skipped line named: 4 bad fields, not JSON, [1, 2], bad UTF-8
    assert (tmp_path / "o" / training.TRAIN_STATE).is_file()


def test_a_step_where_every_sample_fails_stops_the_run(tiny_dir, tmp_path, monkeypatch):
    """A prompt file copied away from its images: the run stops at its first step and says why."""
    d = write_world(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "rl.jsonl"
    moved.write_text((d / "rl.jsonl").read_text())
    monkeypatch.setattr(rl, "reward", token_reward)
    with pytest.raises(SystemExit, match="step 1: all 4 samples failed before generating"):
        rl.main(["--ckpt", str(tiny_dir), "--data", str(d), "--prompts", str(moved), "--out", str(tmp_path / "o"),
                 "--steps", "2", "--batch", "2", *SMALL[2:]])
    assert not (tmp_path / "o" / training.TRAIN_STATE).exists()
