"""rl.py: online GRPO with live multi-turn search rollouts (the paper's second stage), by hand.

    python rl.py                                   # tiny model, synthetic world, from out/sft, CPU, minutes
    python rl.py --resume                          # continue out/rl exactly where it stopped
    python rl.py --bench --out out/rl_bench        # scoring + update with and without shared prompts
    torchrun --standalone --nproc_per_node=2 rl.py                     # DDP (gloo on CPU, NCCL on GPUs)
    torchrun --standalone --nproc_per_node=8 rl.py --preset paper --ckpt /models/qwen2.5-vl-7b-sft \
        --fsdp --grad_ckpt --micro_batch 2 --backend http --server_url http://127.0.0.1:8765

Each step: a batch of RL prompts (sharded over ranks) -> rollout.rollout with G samples per prompt,
tools called for real -> rewards (0.9 x correctness + 0.1 x format, correctness by eval.score) ->
advantages R - mean(R) within each group -> PPO-clipped updates on sampled tokens only (prompt,
tool output and image tokens are masked), with a k3 KL penalty to the frozen starting policy ->
log -> checkpoint. Nothing is re-tokenized: training scores the exact token ids that were sampled.

Precision (--precision, default bf16 on CUDA, fp32 on CPU): trainable parameters and AdamW state are
fp32 masters, matmuls run in bf16 (autocast under DDP; FSDP2 gathers bf16 copies of fp32 shards). In
fp32 the rollout's log-probs equal a fresh forward and serve as the old policy; in bf16 the cached
rollout and a full forward round differently, so the old log-probs are recomputed with the training
forward (the PPO ratio starts at exactly 1) and the log line's `lp_gap` says how far apart they were.
Under FSDP2 the rollout runs on gathered (unsharded) weights with no collectives (model.unsharded).
Scoring and update forward each group's prompt once per micro-batch (model.collate_shared). In the
log line, `tok/s roll` counts sampled tokens per second of rollout; `upd` every token of the
trajectories per second of update, as sft.py counts its sequences, and `trained` the sampled ones.
The KL reference of a LoRA run is the policy with its adapters off; of a full fine-tuning run, a
frozen fp32 copy run like the policy (sharded like it under --fsdp), so the KL starts at exactly 0.

Simplified from the paper: no dynamic sampling or filtering of prompts (groups whose rewards are all
equal get exactly zero advantage and no gradient; their share is logged as zero_adv), one PPO epoch
by default, a fixed LR after warmup. `--preset paper` sets the paper's RL settings (LR 2e-6, warmup
45, G = 8, clip 0.2, KL 0.001, 10 tool calls, one image search, 8,192 tokens); the defaults are what
makes the tiny offline model learn in minutes.
"""
import argparse
import copy
import math
import random
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import eval as E
import model as M
import rollout as R
import tools as T


# ----------------------------------------------------------------------------- rewards

def format_ok(traj):
    """The paper's format reward: every turn was one well-formed action and the trajectory ended in
    an answer (not at a budget, the token limit or an error)."""
    return float(traj.finish == "answer" and all(a.kind != "invalid" for a in traj.actions))


def reward(traj, search_penalty=0.0, judge=None):
    """0.9 x correctness + 0.1 x format. With search_penalty p (MMSearch-R1), a correct answer that
    searched earns (1 - p) of the correctness. Finite by construction: an empty answer scores 0."""
    q = traj.question
    correct = E.score(traj.answer if traj.finish == "answer" else None, q.get("answers", []),
                      question=q.get("question"), judge=judge)
    if correct > 0 and search_penalty > 0 and (traj.n_text_search + traj.n_img_search) > 0:
        correct *= 1.0 - search_penalty
    return 0.9 * correct + 0.1 * format_ok(traj)


def group_advantages(rewards, group_size, scale="none", eps=1e-6):
    """rewards (N,) in question-major groups of G -> advantages (N,): reward minus its group's mean
    (the paper), divided by the group's std when scale == "std" (the original GRPO). A group whose
    rewards are all equal gets exactly 0: in float arithmetic r - mean(r) need not be (0.1 x 8 / 8 !=
    0.1), and dividing that residue by a zero std would blow it up."""
    r = torch.as_tensor(rewards, dtype=torch.float64).view(-1, group_size)  # (Q, G)
    a = r - r.mean(1, keepdim=True)
    if scale == "std":
        a = a / (r.std(1, keepdim=True, unbiased=False) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    equal = (r == r[:, :1]).all(1, keepdim=True)
    return torch.where(equal, 0.0, a).float().flatten()


def grpo_loss(logprobs, old_logprobs, advantages, mask, clip=0.2, ref_logprobs=None, beta=0.0, n_tokens=None):
    """PPO-clipped surrogate with token-level normalisation.
    logprobs, old_logprobs, mask, ref_logprobs: (B, T); advantages: (B,) per trajectory.
    n_tokens: the normaliser (default: mask.sum(); pass the global count when splitting a batch).
    KL to the reference by the k3 estimator exp(ref - lp) - (ref - lp) - 1, which is >= 0 and
    unbiased for KL(pi || ref). Returns (loss, stats)."""
    mask = mask.float()
    n = mask.sum() if n_tokens is None else n_tokens
    n = torch.clamp(torch.as_tensor(n, dtype=torch.float32, device=mask.device), min=1.0)
    ratio = torch.exp((logprobs - old_logprobs) * mask)  # masked positions: ratio 1, no gradient
    adv = advantages[:, None].to(logprobs.dtype)
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)  # (B, T)
    per_token = -surr
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None and beta > 0:
        d = (ref_logprobs - logprobs) * mask
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip).float()
        stats = {"clip_frac": (clipped * mask).sum().item(), "kl": (kl * mask).sum().item(),
                 "ratio": (ratio * mask).sum().item(), "tokens": mask.sum().item()}
    return loss, stats


# ----------------------------------------------------------------------------- data

def step_prompts(questions, step, batch, seed, rank=0, world=1):
    """The prompts of RL step `step`: epochs are seeded permutations of the prompt set, so a resumed
    run draws exactly the prompts an uninterrupted one would; this rank's shard of them."""
    n = len(questions)
    out = []
    for i in range(step * batch, (step + 1) * batch):
        epoch, j = divmod(i, n)
        perm = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(perm)
        out.append(questions[perm[j]])
    return out[rank::world]


def lr_at(step, lr, warmup):
    """Linear warmup over `warmup` RL steps, then constant (the paper: 2e-6 after 45 steps)."""
    return lr * min(1.0, (step + 1) / max(1, warmup))


# ----------------------------------------------------------------------------- one step

def micro_batches(items, size):
    return [items[s:s + size] for s in range(0, len(items), size)]


def micro_size(args):
    return args.micro_batch or args.mini_batch


@torch.no_grad()
def score_old_and_ref(wrapped, items, proc, device, dtype, args, ref=None, collate=M.collate_shared):
    """Per trajectory: "old" log-probs (the rollout's, or in bf16 recomputed by the training forward
    over the same micro-batches as the first update, so that the first ratio is exactly 1) and "ref"
    log-probs of the KL reference. ref: None (no KL), "lora" (the policy, adapters off) or a wrapped
    frozen model. Every rank runs the same number of forwards (FSDP2 gathers in lockstep).
    Returns the mean |rollout - recomputed| log-prob over sampled tokens (0.0 when not recomputed)."""
    recompute = dtype != torch.float32
    gap, n = 0.0, 0.0
    for mb in micro_batches(items, micro_size(args)):
        b = M.to_device(collate(mb, proc, extra_keys=("logprobs",)), device)
        with M.autocast(device, dtype):
            old = wrapped(b, temperature=args.temperature).float() if recompute else b["logprobs"]
            lp_ref = None
            if ref == "lora":
                with M.lora_disabled(M.unwrap(wrapped)):
                    lp_ref = wrapped(b, temperature=args.temperature).float()
            elif ref is not None:
                lp_ref = ref(b, temperature=args.temperature).float()
        mask = b["loss_mask"].float()
        gap += ((old - b["logprobs"]).abs() * mask).sum().item()
        n += mask.sum().item()
        for i, it in enumerate(mb):
            T_ = len(it["input_ids"])
            it["old"] = old[i, :T_].cpu()
            if lp_ref is not None:
                it["ref"] = lp_ref[i, :T_].cpu()
    return gap / max(n, 1.0)


def empty_item(proc):
    """Stands in for a trajectory with no tokens (its image could not be read): one untrained token,
    so that every rank still runs the same forwards (FSDP2 gathers in lockstep) and it adds nothing."""
    return {"input_ids": torch.tensor([proc.im_start_id]), "loss_mask": torch.tensor([0]),
            "logprobs": torch.tensor([0.0]), "image_grid_thw": None, "pixel_values": None}


def update(wrapped, optimizer, params, items, args, proc, device, dtype, step, collate=M.collate_shared):
    """PPO epochs over the rollout batch: one optimizer step per mini-batch of args.mini_batch
    trajectories (per rank), accumulated over micro-batches of args.micro_batch, each token weighted
    1 / (trained tokens of the global mini-batch). Returns summed stats (divide by 'tokens')."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    stats = dict.fromkeys(("clip_frac", "kl", "ratio", "tokens", "entropy", "grad_norm", "updates"), 0.0)
    gen = torch.Generator().manual_seed(args.seed * 31 + step)
    keys = ("old", "ref") if "ref" in items[0] else ("old",)
    for epoch in range(args.ppo_epochs):
        # the first epoch in rollout order: its micro-batches are those the old log-probs came from
        order = torch.randperm(len(items), generator=gen).tolist() if epoch else range(len(items))
        for mini in micro_batches([items[i] for i in order], args.mini_batch):
            (n_tok,) = M.reduce([sum(float(it["loss_mask"].sum()) for it in mini)])
            micros = micro_batches(mini, micro_size(args))
            optimizer.zero_grad(set_to_none=True)
            for k, mb in enumerate(micros):
                b = M.to_device(collate(mb, proc, extra_keys=keys), device)
                adv = torch.tensor([it["adv"] for it in mb], device=device)
                with M.grad_sync(wrapped, k == len(micros) - 1):
                    with M.autocast(device, dtype):
                        lp, ent = wrapped(b, temperature=args.temperature, return_entropy=True)
                    loss, st = grpo_loss(lp.float(), b["old"], adv, b["loss_mask"], args.clip, b.get("ref"),
                                         args.beta, n_tokens=n_tok / world)  # DDP / FSDP average over ranks: undo it
                    loss.backward()
                for key in ("clip_frac", "kl", "ratio", "tokens"):
                    stats[key] += st[key]
                stats["entropy"] += (ent * b["loss_mask"]).sum().item()
            stats["grad_norm"] += M.clip_grad_norm(params, args.grad_clip)
            optimizer.step()
            stats["updates"] += 1
    return stats


def rollout_items(policy, proc, tools, prompts, args, step, rank, world, dtype, judge=None):
    """One step's rollout -> (trajectories, rewards, advantages, training items with "adv")."""
    trajs = R.rollout(policy, proc, tools, prompts, group_size=args.group, max_turns=args.max_turns,
                      max_new_tokens=args.max_new_tokens, max_total_tokens=args.max_total_tokens,
                      temperature=args.temperature, seed=args.seed * 100_003 + step * world + rank,
                      batch_size=max(args.group, 64), dtype=dtype)
    rewards = [reward(t, args.search_penalty, judge) for t in trajs]
    adv = group_advantages(rewards, args.group, args.adv_scale)
    items = [t.item() if t.token_ids else empty_item(proc) for t in trajs]
    for it, a in zip(items, adv.tolist()):
        it["adv"] = a
    return trajs, rewards, adv, items


def bench(wrapped, ref, optimizer, params, proc, tools, questions, args, device, dtype, log):
    """`--bench`: one step's rollout, then its scoring and update from the same weights and optimizer
    state, in turn twice each (the best counts): one forward per trajectory (model.collate), and each
    group's prompt forwarded once (model.collate_shared, what training runs). tok/s counts every token of the trajectories,
    as sft.py counts its sequences; `trained` counts the sampled ones."""
    policy = M.unwrap(wrapped)
    with M.unsharded(wrapped):
        trajs, _, _, items = rollout_items(policy, proc, tools, step_prompts(questions, 0, args.batch, args.seed),
                                           args, 0, 0, 1, dtype)
    n_tok = sum(len(it["input_ids"]) for it in items)
    n_prompt = sum(t.prompt_len for t in trajs)
    trained = sum(float(it["loss_mask"].sum()) for it in items)
    log(f"bench: {len(items)} trajectories ({args.batch} prompts x G={args.group}), {n_tok / len(items):.0f} "
        f"tokens each, of which prompt {n_prompt / len(items):.0f} and sampled {trained / len(items):.0f}")
    images = []  # images through a vision tower, the policy's and the reference's
    towers = [policy.model.visual] + ([M.unwrap(ref).model.visual] if isinstance(ref, nn.Module) else [])
    count = lambda m, a, kw: images.append(len(kw.get("grid_thw", a[1] if len(a) > 1 else [])))  # noqa: E731
    hooks = [t.register_forward_pre_hook(count, with_kwargs=True) for t in towers]
    start = copy.deepcopy(policy.state_dict()), copy.deepcopy(optimizer.state_dict())
    times = {}
    for name, collate in 2 * (("separate", M.collate), ("shared", M.collate_shared)):  # twice in turn: best of 2
        policy.load_state_dict(start[0])
        optimizer.load_state_dict(start[1])
        images.clear()
        policy.train()
        t0 = time.perf_counter()
        score_old_and_ref(wrapped, items, proc, device, dtype, args, ref, collate=collate)
        t1 = time.perf_counter()
        update(wrapped, optimizer, params, items, args, proc, device, dtype, 0, collate=collate)
        t2 = time.perf_counter()
        times[name] = min(times.get(name, float("inf")), t2 - t0)
        log(f"  {name:8s} | score {t1 - t0:.2f}s update {t2 - t1:.2f}s | update tok/s {n_tok / (t2 - t1):,.0f} "
            f"(trained {trained / (t2 - t1):,.0f}) | images through the vision tower {sum(images)}")
    for h in hooks:
        h.remove()
    log(f"  shared prompts: score + update {times['separate'] / times['shared']:.2f}x faster")
    return times


def summarize(trajs, rewards, adv, group_size):
    """Per-step rollout statistics of this rank's trajectories (sums; `n` counts them)."""
    acc = [E.score(t.answer if t.finish == "answer" else None, t.question.get("answers", [])) for t in trajs]
    return {"n": len(trajs), "reward": sum(rewards), "acc": sum(acc), "fmt": sum(format_ok(t) for t in trajs),
            "turns": sum(t.turns for t in trajs), "text": sum(t.n_text_search for t in trajs),
            "img": sum(t.n_img_search - t.n_crop for t in trajs), "crop": sum(t.n_crop for t in trajs),
            "tool_err": sum(t.n_tool_errors for t in trajs), "obs": sum(len(t.observations) for t in trajs),
            "gen_tokens": sum(t.gen_tokens for t in trajs), "seq_tokens": sum(len(t.token_ids) for t in trajs),
            # prompts that do not fit the token budget (raise --max_total_tokens or lower --max_pixels)
            "too_long": sum(t.finish == "length" and t.gen_tokens == 0 for t in trajs),
            "errors": sum(t.finish == "error" for t in trajs),  # bad images: no tokens, no gradient
            "zero_adv": (adv.view(-1, group_size).abs().amax(1) == 0).sum().item() * group_size}


# ----------------------------------------------------------------------------- CLI and main

PRESETS = {  # the paper's RL settings (section 4.1 and appendix); explicit flags still win
    "paper": dict(lr=2e-6, warmup=45, group=8, clip=0.2, beta=0.001, adv_scale="none", max_calls=10,
                  max_img_search=1, max_turns=11, max_total_tokens=8192, max_new_tokens=1024),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Online GRPO with live multi-turn search rollouts.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named set of defaults")
    p.add_argument("--ckpt", default="out/sft", help="the starting policy (the SFT checkpoint)")
    p.add_argument("--data", default="data", help="world folder: search indexes and RL prompts")
    p.add_argument("--prompts", default=None, help="RL prompt JSONL (default: DATA/rl.jsonl)")
    p.add_argument("--out", default="out/rl", help="checkpoint + log.txt + train_state.pt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8, help="prompts per step (all ranks together)")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO group size G)")
    p.add_argument("--mini_batch", type=int, default=16, help="trajectories per optimizer step (per rank)")
    p.add_argument("--micro_batch", type=int, default=0, help="trajectories per forward (gradient "
                   "accumulation inside a mini-batch; 1-2 for 7B; 0: the whole mini-batch)")
    p.add_argument("--ppo_epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-5, help="the paper: 2e-6 for 7B; the tiny model wants more")
    p.add_argument("--warmup", type=int, default=3, help="warmup RL steps (the paper: 45)")
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--beta", type=float, default=0.001, help="KL coefficient (k3) to the starting policy")
    p.add_argument("--adv_scale", choices=("none", "std"), default="none",
                   help="none: R - mean(R) (the paper); std: also divide by the group's std")
    p.add_argument("--search_penalty", type=float, default=0.0, help="MMSearch-R1: correct-with-search x (1-p)")
    p.add_argument("--judge_url", default=None, help="OpenAI-compatible endpoint for an LLM judge")
    p.add_argument("--judge_model", default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_turns", type=int, default=6, help="assistant turns per trajectory")
    p.add_argument("--max_calls", type=int, default=10, help="tool calls per trajectory")
    p.add_argument("--max_img_search", type=int, default=1, help="image searches per trajectory")
    p.add_argument("--max_new_tokens", type=int, default=64, help="per assistant turn")
    p.add_argument("--max_total_tokens", type=int, default=1024, help="token budget per trajectory")
    p.add_argument("--max_pixels", type=int, default=None, help="image size cap (default: the checkpoint's, "
                   "at most 1280x28x28 for real ones)")
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--lora_rank", type=int, default=0, help="0: full fine-tuning")
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--freeze_vision", action=argparse.BooleanOptionalAction, default=True,
                   help="train the language model only (as sft.py does by default)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 sharding instead of DDP")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in the decoder blocks")
    p.add_argument("--separate_forwards", action="store_true", help="score and update each trajectory on its "
                   "own (the model's attention, flash-attn included) instead of forwarding a group's prompt once "
                   "with explicit masks: m x T x (n + 1) T bytes for n prompts and m packed rows of T tokens")
    p.add_argument("--precision", choices=sorted(M.PRECISIONS), default=None,
                   help="compute precision (default bf16 on CUDA, fp32 on CPU); masters are fp32")
    T.add_search_args(p)
    p.add_argument("--cache", default=None, help="SQLite search cache path")
    p.add_argument("--save_every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly (fresh if it has none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--bench", action="store_true", help="time one step's scoring + update with and without "
                   "shared prompts (one process; writes nothing but --out's log)")
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    return p.parse_args(argv)


def build_models(args, resume, device, dtype, log):
    """(policy, reference, processor). The policy's trainable parameters are fp32; a LoRA run's frozen
    base is loaded in the compute dtype. It starts at args.ckpt, or on --resume at the run's own
    checkpoint (full fine-tuning: its fp32 weights; LoRA: the base plus its saved adapter). The
    reference is the frozen start: "lora" (adapters off), a frozen copy stored like the policy (so
    that the same forward gives KL exactly 0 at the start), or None."""
    out = Path(args.out)
    resume_full = resume and not args.lora_rank
    policy, proc = M.load(out if resume_full else args.ckpt, device=device,
                          dtype=dtype if args.lora_rank else torch.float32, log=log, max_pixels=args.max_pixels)
    if args.freeze_vision:
        policy.model.visual.requires_grad_(False)
    if args.lora_rank:
        torch.manual_seed(args.seed)  # the same LoRA init on every rank (FSDP2 does not broadcast it)
        M.add_lora(policy, args.lora_rank, args.lora_alpha)
        if resume:
            M.load_adapter(policy, out)
    if args.grad_ckpt:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = None
    if args.beta > 0:
        ref = "lora" if args.lora_rank else M.load(args.ckpt, device=device, dtype=torch.float32, log=None,
                                                   max_pixels=args.max_pixels)[0].requires_grad_(False)
    for m in (policy, ref):  # a group's prompt is forwarded once in scoring and update (collate_shared)
        if isinstance(m, nn.Module) and not args.separate_forwards:
            M.use_shared_prompt_attention(m)
    return policy, ref, proc


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = M.setup_dist()
    if args.batch % world:
        raise SystemExit(f"rl.py: --batch {args.batch} must divide over {world} ranks")
    if args.mini_batch % micro_size(args):
        raise SystemExit(f"rl.py: --mini_batch {args.mini_batch} is not a multiple of --micro_batch {args.micro_batch}")
    dtype = M.compute_dtype(args.precision, device)
    torch.manual_seed(args.seed + rank)
    out = Path(args.out)
    if rank == 0:
        M.recover(out)  # finish a checkpoint swap that a kill interrupted
    M.barrier()
    log = M.RunLog(out / "log.txt", args)
    try:  # bad input fails before any work; bad lines are skipped, named path:line in the log
        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always")
            questions = T.load_questions(args.prompts or f"{args.data}/rl.jsonl")
    except (OSError, ValueError) as e:
        raise SystemExit(f"rl.py: {e}") from None
    for w in skipped:
        log(str(w.message))
    resume = args.resume and (out / M.TRAIN_STATE).is_file()
    if args.resume and not resume:  # a job script may always pass --resume, from its first launch on
        log(f"--resume: no {out / M.TRAIN_STATE}, starting fresh")
    policy, ref, proc = build_models(args, resume, device, dtype, log)
    mode = "fsdp" if args.fsdp else "ddp"
    wrapped = M.wrap(policy, mode, device, dtype)
    if ref is not None and ref != "lora":
        ref = M.wrap(ref, "fsdp" if args.fsdp else "none", device, dtype)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    start = 0
    if resume:
        start, _ = M.load_train_state(out, optimizer, None, model=wrapped)
        log(f"resumed at step {start}")
    judge = E.Judge(args.judge_url, args.judge_model) if args.judge_url else None
    tools = T.make_tools(args.data, cache=args.cache, max_calls=args.max_calls, max_img_search=args.max_img_search,
                         **T.search_options(args))
    log(f"{len(questions)} RL prompts; {args.batch} x G={args.group} per step on {world} rank(s) ({mode}); "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters "
        f"({', '.join(sorted({str(p.dtype) for p in params}))}); compute {dtype}; attention "
        f"{policy.config._attn_implementation} (text decoder {policy.model.language_model.config._attn_implementation}); "
        f"reference {'adapters off' if ref == 'lora' else ref and 'frozen copy'}; "
        f"old log-probs {'rollout' if dtype == torch.float32 else 'recomputed'}")
    if args.bench:
        if world > 1 or args.separate_forwards:
            raise SystemExit("rl.py --bench: one process, both layouts (no torchrun, no --separate_forwards)")
        return bench(wrapped, ref, optimizer, params, proc, tools, questions, args, device, dtype, log)
    for step in range(start, args.steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup)
        prompts = step_prompts(questions, step, args.batch, args.seed, rank, world)
        t0 = time.perf_counter()
        with M.unsharded(wrapped):  # FSDP2: whole weights, no collectives while ranks decode
            trajs, rewards, adv, items = rollout_items(policy, proc, tools, prompts, args, step, rank, world, dtype,
                                                       judge)
        t_roll = time.perf_counter() - t0
        t0 = time.perf_counter()
        policy.train()
        collate = M.collate if args.separate_forwards else M.collate_shared
        gap = score_old_and_ref(wrapped, items, proc, device, dtype, args, ref, collate=collate)
        t_score = time.perf_counter() - t0
        st = update(wrapped, optimizer, params, items, args, proc, device, dtype, step, collate=collate)
        policy.eval()
        t_upd = time.perf_counter() - t0 - t_score
        s = summarize(trajs, rewards, adv, args.group)
        keys = sorted(s) + ["clip_frac", "kl", "ratio", "tokens", "entropy"]
        tot = dict(zip(keys, M.reduce([s[k] for k in sorted(s)] + [st[k] for k in keys[len(s):]])))
        # times, throughput, gap, grad norm: the slowest / largest rank's
        mx = dict(zip(("t_roll", "t_score", "t_upd", "gap", "gnorm"),
                      M.reduce([t_roll, t_score, t_upd, gap, st["grad_norm"] / max(1, st["updates"])], op="max")))
        n, tok, obs = tot["n"], max(tot["tokens"], 1.0), max(tot["obs"], 1.0)
        log(f"step {step + 1:4d} | reward {tot['reward'] / n:.3f} | acc {tot['acc'] / n:.3f} | fmt {tot['fmt'] / n:.2f} | "
            f"turns {tot['turns'] / n:.2f} | search/q text {tot['text'] / n:.2f} img {tot['img'] / n:.2f} "
            f"crop {tot['crop'] / n:.2f} | tool_err {tot['tool_err'] / obs:.2f} | len {tot['gen_tokens'] / n:.0f} | "
            f"zero_adv {tot['zero_adv'] / n:.2f} | too_long {tot['too_long']:.0f} | errors {tot['errors']:.0f} | "
            f"clip {tot['clip_frac'] / tok:.3f} | kl {tot['kl'] / tok:.4f} | ent {tot['entropy'] / tok:.3f} | "
            f"lp_gap {mx['gap']:.4f} | gnorm {mx['gnorm']:.2f} | lr {lr_at(step, args.lr, args.warmup):.2e} | "
            f"tok/s roll {tot['gen_tokens'] / max(mx['t_roll'], 1e-9):.0f} upd {tot['seq_tokens'] / max(mx['t_upd'], 1e-9):.0f} "
            f"(trained {tot['tokens'] / max(mx['t_upd'], 1e-9):.0f}) | "
            f"time roll {mx['t_roll']:.1f}s score {mx['t_score']:.1f}s upd {mx['t_upd']:.1f}s")
        if not all(math.isfinite(tot[k]) for k in ("reward", "kl", "entropy")):
            raise SystemExit(f"rl.py: step {step + 1}: non-finite statistics; last good checkpoint is {out}")
        if tot["errors"] == n:  # e.g. a prompt file moved away from its images: every step would learn nothing
            why = next((t.observations[-1].text for t in trajs if t.finish == "error"), "see the other ranks")
            raise SystemExit(f"rl.py: step {step + 1}: all {n:.0f} samples failed before generating (first: {why}); "
                             "nothing of this step is saved")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            meta = {"stage": "rl", "base": args.ckpt, "config": vars(args)}
            M.save_checkpoint(wrapped, proc, out, meta, optimizer, step=step + 1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
