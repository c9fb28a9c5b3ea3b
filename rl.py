"""rl.py: online GRPO with live multi-turn search rollouts (the paper's second stage), by hand.

    python rl.py                                   # tiny model, synthetic world, from out/sft, CPU, minutes
    python rl.py --resume                          # continue out/rl exactly where it stopped
    python rl.py --bench --out out/rl_bench        # scoring + update: shared prompts, image features or not
    torchrun --standalone --nproc_per_node=2 rl.py                     # DDP (gloo on CPU, NCCL on GPUs)
    torchrun --standalone --nproc_per_node=8 rl.py --preset paper --ckpt /models/qwen2.5-vl-7b-sft \\
        --fsdp --grad_ckpt --micro_batch 2 --backend http --server_url http://127.0.0.1:8765

A step: sample G = --group trajectories for each of --batch prompts, tools called for real; reward each
0.9 x correctness (eval.score) + 0.1 x format; advantage R - mean(R) within its group; then one AdamW
step per mini-batch on the PPO-clipped surrogate + beta x k3 KL to the frozen start, over the sampled
tokens only, each weighted 1 / (sampled tokens of the global mini-batch). Training scores the exact ids
that were sampled, with the rollout's image features (the frozen vision tower runs once per image per
step), on fp32 master weights (--precision bf16, the CUDA default, computes in bf16). In the log,
`tok/s roll` counts sampled tokens per second of rollout, `upd` every token per second of update.
Simplified from the paper: no dynamic sampling or filtering of prompts (a group of equal rewards gets
exactly zero advantage and no gradient; its share is logged as zero_adv), no std normalisation, one PPO
epoch, a fixed LR after warmup, the vision tower frozen. `--preset paper` sets the paper's settings;
the defaults make the tiny offline model learn in minutes.
"""
import argparse
import collections
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
import search as S
import tools as T
import training

PRESETS = {  # the paper's RL settings (section 4.1 and appendix); explicit flags win
    "paper": dict(lr=2e-6, warmup=45, group=8, clip=0.2, beta=0.001, max_turns=11, max_total_tokens=8192,
                  max_new_tokens=1024),
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
    p.add_argument("--micro_batch", type=int, default=0, help="trajectories per forward (1-2 for 7B; 0: mini_batch)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup", type=int, default=3, help="warmup RL steps")
    p.add_argument("--clip", type=float, default=0.2, help="PPO clip range of the ratio")
    p.add_argument("--beta", type=float, default=0.001, help="KL coefficient (k3) to the starting policy")
    p.add_argument("--judge_url", default=None, help="OpenAI-compatible endpoint for an LLM judge")
    p.add_argument("--judge_model", default=None)
    p.add_argument("--max_turns", type=int, default=6, help="assistant turns per trajectory")
    p.add_argument("--max_new_tokens", type=int, default=64, help="per assistant turn")
    p.add_argument("--max_total_tokens", type=int, default=1024, help="token budget per trajectory")
    p.add_argument("--max_pixels", type=int, default=None, help="image size cap (default: the checkpoint's)")
    p.add_argument("--lora_rank", type=int, default=0, help="0: full fine-tuning")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 sharding instead of DDP")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in the decoder blocks")
    p.add_argument("--separate_forwards", action="store_true", help="one row per trajectory (the model's own "
                   "attention) instead of a group's prompt once")
    p.add_argument("--precision", choices=sorted(M.PRECISIONS), default=None, help="default: bf16 on CUDA, else fp32")
    S.add_search_args(p)
    p.add_argument("--cache", default=None, help="SQLite search cache path")
    p.add_argument("--save_every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly (fresh if it has none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--bench", action="store_true", help="time scoring + update: shared prompts, image features or not")
    p.set_defaults(**PRESETS.get(p.parse_known_args(argv)[0].preset, {}))
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- rewards and loss

def format_ok(traj):
    """Every turn was one well-formed action and the trajectory ended in an answer (not a budget or error)."""
    return float(traj.finish == "answer" and all(a.kind != "invalid" for a in traj.actions))


def reward(traj, judge=None):
    """0.9 x correctness + 0.1 x format. Finite by construction: an empty answer scores 0."""
    q = traj.question
    correct = E.score(traj.answer if traj.finish == "answer" else None, q.get("answers", []),
                      question=q.get("question"), judge=judge)
    return 0.9 * correct + 0.1 * format_ok(traj)


def group_advantages(rewards, group_size):
    """rewards (N,) in question-major groups of G -> advantages (N,): reward minus its group's mean.
    A group whose rewards are all equal gets exactly 0 (in floats r - mean(r) need not be: 0.1 x 8 / 8)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).view(-1, group_size)  # (Q, G)
    equal = (r == r[:, :1]).all(1, keepdim=True)
    return torch.where(equal, 0.0, r - r.mean(1, keepdim=True)).float().flatten()


def grpo_loss(logprobs, old_logprobs, advantages, mask, clip=0.2, ref_logprobs=None, beta=0.0, n_tokens=None):
    """PPO-clipped surrogate + beta x KL, a sum over masked tokens / n_tokens (default mask.sum()) -> (loss, stats).
    logprobs, old_logprobs, mask, ref_logprobs: (B, T); advantages: (B,). KL by the k3 estimator
    exp(ref - lp) - (ref - lp) - 1: >= 0 and unbiased for KL(pi || ref)."""
    mask = mask.float()
    n = mask.sum() if n_tokens is None else n_tokens
    n = torch.clamp(torch.as_tensor(n, dtype=torch.float32, device=mask.device), min=1.0)
    ratio = torch.exp((logprobs - old_logprobs) * mask)  # masked positions: ratio 1, no gradient
    adv = advantages[:, None].to(logprobs.dtype)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)  # (B, T)
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


# ----------------------------------------------------------------------------- one step

def step_prompts(questions, step, batch, seed, rank=0, world=1):
    """This rank's share of step `step`'s prompts. Epochs are seeded permutations of the prompt set, so a
    resumed run draws exactly the prompts an uninterrupted one would."""
    n, out = len(questions), []
    for i in range(step * batch, (step + 1) * batch):
        epoch, j = divmod(i, n)
        perm = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(perm)
        out.append(questions[perm[j]])
    return out[rank::world]


def chunks(items, size):
    return [items[s:s + size] for s in range(0, len(items), size)]


def rollout_items(policy, proc, tools, prompts, args, step, rank, world, dtype, judge=None):
    """One step's rollout -> (trajectories, rewards, advantages, training items with "adv"). Items carry the
    rollout's image features, so scoring and update never run the vision tower. A trajectory that sampled
    nothing (bad image, prompt over budget) trains as one masked token: every rank runs the same forwards."""
    trajs = R.rollout(policy, proc, tools, prompts, group_size=args.group, max_turns=args.max_turns,
                      max_new_tokens=args.max_new_tokens, max_total_tokens=args.max_total_tokens, temperature=1.0,
                      seed=args.seed * 100_003 + step * world + rank, batch_size=max(args.group, 64), dtype=dtype,
                      keep_features=True)
    rewards = [reward(t, judge) for t in trajs]
    adv = group_advantages(rewards, args.group)
    empty = {"input_ids": torch.tensor([proc.im_start_id]), "loss_mask": torch.tensor([0]),
             "logprobs": torch.tensor([0.0]), "image_grid_thw": None, "pixel_values": None}
    items = [dict(t.item() if t.gen_tokens else empty, adv=a) for t, a in zip(trajs, adv.tolist())]
    return trajs, rewards, adv, items


@torch.no_grad()
def score_old_and_ref(wrapped, ref, items, proc, device, dtype, args, micro, collate):
    """Sets each item's "old" log-probs (the rollout's; in bf16 recomputed by the training forward, so that
    the first update's ratio is exactly 1) and "ref" ones (ref None: no KL) -> mean |rollout - old|."""
    gap, n = 0.0, 0.0
    for mb in chunks(items, micro):
        b = M.to_device(collate(mb, proc, extra_keys=("logprobs",)), device)
        with M.autocast(device, dtype):
            old = b["logprobs"] if dtype == torch.float32 else wrapped(b).float()
            lp_ref = None if ref is None else ref(b).float()  # (B, T)
        gap += ((old - b["logprobs"]).abs() * b["loss_mask"]).sum().item()
        n += b["loss_mask"].sum().item()
        for i, it in enumerate(mb):
            it["old"] = old[i, :len(it["input_ids"])].cpu()
            if lp_ref is not None:
                it["ref"] = lp_ref[i, :len(it["input_ids"])].cpu()
    return gap / max(n, 1.0)


def update(wrapped, optimizer, params, items, proc, device, dtype, args, micro, world, collate):
    """One PPO epoch in rollout order: an optimizer step per mini-batch of args.mini_batch trajectories
    (per rank), accumulated over micro-batches -> summed stats (divide by 'tokens')."""
    stats = collections.Counter()
    keys = ("old", "ref") if "ref" in items[0] else ("old",)
    for mini in chunks(items, args.mini_batch):
        (n_tok,) = M.reduce([sum(float(it["loss_mask"].sum()) for it in mini)])
        micros = chunks(mini, micro)
        optimizer.zero_grad(set_to_none=True)
        for k, mb in enumerate(micros):
            b = M.to_device(collate(mb, proc, extra_keys=keys), device)
            adv = torch.tensor([it["adv"] for it in mb], device=device)  # (B,)
            with training.grad_sync(wrapped, k == len(micros) - 1):
                with M.autocast(device, dtype):
                    lp, ent = wrapped(b, return_entropy=True)  # (B, T)
                loss, st = grpo_loss(lp.float(), b["old"], adv, b["loss_mask"], args.clip, b.get("ref"),
                                     args.beta, n_tokens=n_tok / world)  # DDP / FSDP average over ranks: undo it
                loss.backward()
            stats.update(st, entropy=(ent * b["loss_mask"]).sum().item())
        stats.update(grad_norm=training.clip_grad_norm(params, 1.0), updates=1)
        optimizer.step()
    return stats


def summarize(trajs, rewards, adv, group_size, st):
    """One step's statistics on this rank (sums; `n` counts trajectories); st: update's."""
    acc = [E.score(t.answer if t.finish == "answer" else None, t.question.get("answers", [])) for t in trajs]
    return {"n": len(trajs), "reward": sum(rewards), "acc": sum(acc), "fmt": sum(format_ok(t) for t in trajs),
            "turns": sum(t.turns for t in trajs), "text": sum(t.n_text_search for t in trajs),
            "img": sum(t.n_img_search - t.n_crop for t in trajs), "crop": sum(t.n_crop for t in trajs),
            "tool_err": sum(t.n_tool_errors for t in trajs), "obs": sum(len(t.observations) for t in trajs),
            "gen_tokens": sum(t.gen_tokens for t in trajs), "seq_tokens": sum(len(t.token_ids) for t in trajs),
            # prompts that do not fit the token budget (raise --max_total_tokens or lower --max_pixels)
            "too_long": sum(t.finish == "length" and t.gen_tokens == 0 for t in trajs),
            "errors": sum(t.finish == "error" for t in trajs),  # bad images: no tokens, no gradient
            "zero_adv": (adv.view(-1, group_size).abs().amax(1) == 0).sum().item() * group_size,
            **{k: st[k] for k in ("clip_frac", "kl", "tokens", "entropy")}}


def bench(wrapped, ref, optimizer, params, proc, tools, questions, args, device, dtype, micro, log):
    """`--bench`: one step's rollout, then its scoring and update from the same start three ways, in turn
    twice (the best counts: a first pass pays first-touch memory): one forward per trajectory from pixels,
    each group's prompt forwarded once from pixels, and that from the rollout's image features (rl.py's)."""
    policy = training.unwrap(wrapped)
    images = []  # images through a vision tower, the policy's and the reference's
    towers = [policy.model.visual] + ([training.unwrap(ref).model.visual] if isinstance(ref, nn.Module) else [])
    count = lambda m, a, kw: images.append(len(kw.get("grid_thw", a[1] if len(a) > 1 else [])))  # noqa: E731
    hooks = [t.register_forward_pre_hook(count, with_kwargs=True) for t in towers]
    with training.unsharded(wrapped):
        trajs, _, _, items = rollout_items(policy, proc, tools, step_prompts(questions, 0, args.batch, args.seed),
                                           args, 0, 0, 1, dtype)
    n, n_tok = len(items), sum(len(it["input_ids"]) for it in items)
    trained = sum(float(it["loss_mask"].sum()) for it in items)
    log(f"bench: {n} trajectories ({args.batch} prompts x G={args.group}), {n_tok / n:.0f} tokens each, of "
        f"which prompt {sum(t.prompt_len for t in trajs) / n:.0f} and sampled {trained / n:.0f}; "
        f"{sum(images)} images through the vision tower in the rollout")
    pixels = [dict(t.item(pixels=True), adv=it["adv"]) if t.gen_tokens else it for t, it in zip(trajs, items)]
    ways = (("separate", M.collate, pixels), ("shared", M.collate_shared, pixels),
            ("shared+features", M.collate_shared, items))
    start, times = (copy.deepcopy(policy.state_dict()), copy.deepcopy(optimizer.state_dict())), {}
    for name, collate, its in 2 * ways:
        policy.load_state_dict(start[0])
        optimizer.load_state_dict(start[1])
        images.clear()
        policy.train()
        t0 = time.perf_counter()
        score_old_and_ref(wrapped, ref, its, proc, device, dtype, args, micro, collate)
        t1 = time.perf_counter()
        update(wrapped, optimizer, params, its, proc, device, dtype, args, micro, 1, collate)
        t2 = time.perf_counter()
        times[name] = min(times.get(name, float("inf")), t2 - t0)
        log(f"  {name:15s} | score {t1 - t0:.2f}s update {t2 - t1:.2f}s | update tok/s {n_tok / (t2 - t1):,.0f} "
            f"(trained {trained / (t2 - t1):,.0f}) | images through the vision tower {sum(images)}")
    for h in hooks:
        h.remove()
    log(f"  score + update against separate: shared {times['separate'] / times['shared']:.2f}x, "
        f"shared+features {times['separate'] / times['shared+features']:.2f}x faster")
    return times


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = get_args(argv)
    micro = args.micro_batch or args.mini_batch
    if args.mini_batch % micro:
        raise SystemExit(f"rl.py: --mini_batch {args.mini_batch} is not a multiple of --micro_batch {args.micro_batch}")
    rank, world, device, log, resume = training.start_run(args)
    if args.batch % world:
        raise SystemExit(f"rl.py: --batch {args.batch} must divide over {world} ranks")
    out, dtype = Path(args.out), M.compute_dtype(args.precision, device)
    torch.manual_seed(args.seed + rank)
    try:  # bad input fails before any work; bad lines are skipped, named path:line in the log
        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always")
            questions = T.load_questions(args.prompts or f"{args.data}/rl.jsonl")
    except (OSError, ValueError) as e:
        raise SystemExit(f"rl.py: {e}") from None
    for w in skipped:
        log(str(w.message))

    # The policy and the KL reference, the frozen start (beta 0: none): a LoRA policy with its adapters off,
    # or a frozen fp32 copy stored and run like the policy, so that the same forward gives KL exactly 0 at first.
    policy, proc = training.load_trainable(args, args.ckpt, resume, device, dtype, log)
    ref = None
    if args.beta > 0 and not args.lora_rank:
        ref = M.load(args.ckpt, device=device, dtype=torch.float32, log=None, max_pixels=args.max_pixels)[0]
        ref.requires_grad_(False)
    for m in (policy, ref):
        if m is not None and not args.separate_forwards:
            M.use_shared_prompt_attention(m)
    mode = "fsdp" if args.fsdp else "ddp"
    wrapped = training.wrap(policy, mode, device, dtype)
    if ref is not None:
        ref = training.wrap(ref, "fsdp" if args.fsdp else "none", device, dtype)
    elif args.beta > 0:
        def ref(b):
            with training.lora_disabled(policy):
                return wrapped(b)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    start = 0
    if resume:
        start, _ = training.load_train_state(out, optimizer, None, model=wrapped)
        log(f"resumed at step {start}")
    judge = E.Judge(args.judge_url, args.judge_model) if args.judge_url else None
    tools = S.make_tools(args.data, cache=args.cache, **S.search_options(args))
    log(f"{len(questions)} RL prompts; {args.batch} x G={args.group} per step on {world} rank(s) ({mode}); "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters "
        f"({', '.join(sorted({str(p.dtype) for p in params}))}); compute {dtype}; attention "
        f"{policy.config._attn_implementation} "
        f"(text decoder {policy.model.language_model.config._attn_implementation}); "
        f"reference {('adapters off' if args.lora_rank else 'frozen copy') if ref is not None else None}; "
        f"old log-probs {'rollout' if dtype == torch.float32 else 'recomputed'}")
    if args.bench:
        if world > 1 or args.separate_forwards:
            raise SystemExit("rl.py --bench: one process, both layouts (no torchrun, no --separate_forwards)")
        return bench(wrapped, ref, optimizer, params, proc, tools, questions, args, device, dtype, micro, log)
    collate = M.collate if args.separate_forwards else M.collate_shared

    for step in range(start, args.steps):
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))  # linear warmup, then constant
        for g in optimizer.param_groups:
            g["lr"] = lr
        prompts = step_prompts(questions, step, args.batch, args.seed, rank, world)
        t0 = time.perf_counter()
        with training.unsharded(wrapped):  # FSDP2: whole weights, no collectives while ranks decode
            trajs, rewards, adv, items = rollout_items(policy, proc, tools, prompts, args, step, rank, world, dtype,
                                                       judge)
        t1 = time.perf_counter()
        policy.train()
        gap = score_old_and_ref(wrapped, ref, items, proc, device, dtype, args, micro, collate)
        t2 = time.perf_counter()
        st = update(wrapped, optimizer, params, items, proc, device, dtype, args, micro, world, collate)
        policy.eval()
        t3 = time.perf_counter()

        # statistics: sums over ranks; times, lp_gap and grad norm: the slowest / largest rank's
        s = summarize(trajs, rewards, adv, args.group, st)
        tot = dict(zip(s, M.reduce(s.values())))
        mx = dict(zip(("t_roll", "t_score", "t_upd", "gap", "gnorm"),
                      M.reduce([t1 - t0, t2 - t1, t3 - t2, gap, st["grad_norm"] / max(1, st["updates"])], op="max")))
        n, tok, obs = tot["n"], max(tot["tokens"], 1.0), max(tot["obs"], 1.0)
        log(f"step {step + 1:4d} | reward {tot['reward'] / n:.3f} | acc {tot['acc'] / n:.3f} | "
            f"fmt {tot['fmt'] / n:.2f} | turns {tot['turns'] / n:.2f} | "
            f"search/q text {tot['text'] / n:.2f} img {tot['img'] / n:.2f} "
            f"crop {tot['crop'] / n:.2f} | tool_err {tot['tool_err'] / obs:.2f} | len {tot['gen_tokens'] / n:.0f} | "
            f"zero_adv {tot['zero_adv'] / n:.2f} | too_long {tot['too_long']:.0f} | errors {tot['errors']:.0f} | "
            f"clip {tot['clip_frac'] / tok:.3f} | kl {tot['kl'] / tok:.4f} | ent {tot['entropy'] / tok:.3f} | "
            f"lp_gap {mx['gap']:.4f} | gnorm {mx['gnorm']:.2f} | lr {lr:.2e} | "
            f"tok/s roll {tot['gen_tokens'] / max(mx['t_roll'], 1e-9):.0f} "
            f"upd {tot['seq_tokens'] / max(mx['t_upd'], 1e-9):.0f} "
            f"(trained {tot['tokens'] / max(mx['t_upd'], 1e-9):.0f}) | "
            f"time roll {mx['t_roll']:.1f}s score {mx['t_score']:.1f}s upd {mx['t_upd']:.1f}s")
        if not all(math.isfinite(tot[k]) for k in ("reward", "kl", "entropy")):
            raise SystemExit(f"rl.py: step {step + 1}: non-finite statistics; last good checkpoint is {out}")
        if tot["errors"] == n:  # e.g. a prompt file moved away from its images: every step would learn nothing
            why = next((t.observations[-1].text for t in trajs if t.finish == "error"), "see the other ranks")
            raise SystemExit(f"rl.py: step {step + 1}: all {n:.0f} samples failed before generating (first: {why}); "
                             "nothing of this step is saved")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            training.save_checkpoint(wrapped, proc, out, {"stage": "rl", "base": args.ckpt, "config": vars(args)},
                                     optimizer, step=step + 1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
