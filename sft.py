"""sft.py: cold-start supervised fine-tuning on multi-turn tool-use trajectories (the paper's first stage).

    python sft.py                                     # tiny model (data/tiny) on data/sft.jsonl, CPU, minutes
    python sft.py --resume                            # continue out/sft exactly where it stopped
    torchrun --standalone --nproc_per_node=2 sft.py   # DDP (gloo on CPU, NCCL on GPUs)
    torchrun --standalone --nproc_per_node=8 sft.py --lora_rank 8 --grad_ckpt \\
        --model /path/to/Qwen2.5-VL-7B-Instruct --data /path/to/sft.jsonl --out out/sft_7b_lora \\
        --batch_size 64 --micro_batch 2   # the paper's recipe (full fine-tuning of 7B: --fsdp, no LoRA)

The loss is the negative log-likelihood of what the assistant writes (model.render's loss mask: its
reasoning, action and closing <|im_end|>; never tool results, user text or image tokens), a mean over
the trained tokens of the global batch, so 1 process and N give the same numbers. AdamW on fp32 masters
(--precision bf16, the CUDA default, computes in bf16), linear warmup then cosine, gradient norm clipped
at 1. The data are scanned once for lengths; each micro-batch is rendered when needed.
The paper: LoRA r=8, LR 1e-4, cosine, warmup ratio 0.1, 3 epochs, vision frozen. Simplified: no weight
decay; batches mix question kinds, never grouped by length (a batch of one kind hides the contrast that
decides search vs answer); the tiny model is fully fine-tuned (its sight comes from make_data's caption
warm-up, so vision stays frozen). Outputs in --out: the checkpoint (Hugging Face layout, fp32, LoRA
folded in; a LoRA run's adapter in PEFT's layout in adapter/), log.txt, train_state.pt.
"""
import argparse
import contextlib
import hashlib
import io
import itertools
import json
import math
import random
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import eval as E
import model as M
import search as S
import tools as T
import training


def get_args(argv=None):
    p = argparse.ArgumentParser(description="cold-start SFT on multi-turn tool-use trajectories",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="data/tiny", help="checkpoint folder to start from (tiny or real Qwen2.5-VL)")
    p.add_argument("--data", default="data/sft.jsonl", help="SFT trajectories JSONL")
    p.add_argument("--out", default="out/sft", help="output folder: checkpoint, log.txt, train_state.pt")
    p.add_argument("--eval_n", type=int, default=64, help="trajectories held out (at most a tenth; 0: none)")
    p.add_argument("--strict", action="store_true", help="a bad JSONL line is fatal instead of skipped")
    p.add_argument("--max_len", type=int, default=4096, help="skip (and count) trajectories longer than this")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max_steps", type=int, default=0, help="cap on optimizer steps and the LR schedule (0: none)")
    p.add_argument("--batch_size", type=int, default=16, help="global batch in trajectories")
    p.add_argument("--micro_batch", type=int, default=4, help="trajectories per forward per rank (tiny: 8 pads 24%%)")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default: LoRA 1e-4, tiny 2e-3, else 1e-5)")
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--min_lr_ratio", type=float, default=0.0, help="cosine decays to lr x this")
    p.add_argument("--max_bad_steps", type=int, default=5, help="abort after this many non-finite steps in a row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (alpha 16; 0: full fine-tuning)")
    p.add_argument("--freeze_vision", action=argparse.BooleanOptionalAction, default=True, help="as the paper")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in the decoder and vision blocks")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 sharding per block instead of DDP (for 7B)")
    p.add_argument("--precision", choices=sorted(M.PRECISIONS), default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--max_pixels", type=int, default=None, help="image size cap (default: the checkpoint's)")
    p.add_argument("--eval_every", type=int, default=250, help="held-out loss every N steps and at the end")
    p.add_argument("--agent_eval_n", type=int, default=16, help="agent accuracy on N questions at each evaluation")
    p.add_argument("--save_every", type=int, default=250, help="checkpoint every N steps and at the end")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--stop_after_steps", type=int, default=0, help="stop cleanly after N steps, as if preempted")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data

def need(ok, why):
    if not ok:
        raise ValueError(why)


def read_line(line, base_dir):
    """One JSONL line (bytes) -> (row, RGB images, sha1 of the line and the images' files), or a ValueError
    saying what is wrong. Images are decoded fully, so a truncated file whose header is fine fails here."""
    try:
        row = json.loads(line)
    except ValueError as e:  # JSONDecodeError or UnicodeDecodeError
        why = "not valid UTF-8" if isinstance(e, UnicodeDecodeError) else f"not valid JSON ({e.msg})"
        raise ValueError(why) from None
    need(isinstance(row, dict), "not a JSON object")
    for k in ("id", "images", "messages"):
        need(k in row, f"missing field {k!r}")
    msgs, paths = row["messages"], row["images"]
    need(isinstance(paths, list) and all(isinstance(x, str) for x in paths), "'images' is not a list of paths")
    need(isinstance(msgs, list) and msgs, "'messages' is not a non-empty list")
    for m in msgs:
        need(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
             and isinstance(m.get("content"), str),
             f"bad message {str(m)[:80]!r} (want role system|user|assistant, string content)")
    need(any(m["role"] == "assistant" for m in msgs), "no assistant message: nothing to train on")
    n_ph = sum(m["content"].count(M.IMAGE) for m in msgs)
    need(n_ph == len(paths), f"{n_ph} {M.IMAGE} placeholders but {len(paths)} images")
    images, sha = [], hashlib.sha1(line)
    for f in (Path(base_dir) / rel for rel in paths):
        need(f.exists(), f"image not found: {f}")
        try:
            data = f.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"corrupt image {f} ({e})") from None
        sha.update(data)
    return row, images, sha.hexdigest()


def scan_line(line, base_dir, processor):
    """One JSONL line -> {id, length, n_trained, digest}, or ValueError. model.render counts the image
    tokens from the images' sizes alone: no pixel is resized."""
    row, images, sha = read_line(line, base_dir)
    try:
        r = M.render(processor, row["messages"], images, pixels=False)
    except ValueError as e:
        raise ValueError(f"cannot render ({e})") from None
    return {"id": str(row["id"]), "length": len(r["input_ids"]), "n_trained": int(r["loss_mask"].sum()),
            "digest": sha}


def load_sft(path, processor, strict=False, max_len=None, log=print, rank=0, world=1):
    """Scan a JSONL file of trajectories -> small records {id, where (path:lineno), file, offset, length,
    n_trained, digest}, the same on every rank (rank r scans lines r::world; a collective). A bad line is
    logged as path:lineno and skipped (strict: a ValueError naming it); longer than max_len: counted."""
    path = Path(path)
    with open(path, "rb") as f:
        lines = f.readlines()  # split at b"\n" only, JSONL's rule, so byte offsets and line numbers hold
    offsets = list(itertools.accumulate(map(len, lines), initial=0))
    mine = []  # per line of this rank: a record, the reason it is bad, or None for a blank line
    for i in tqdm(range(rank, len(lines), world), desc=f"scan {path.name}", leave=False, disable=world > 1):
        try:
            mine.append(scan_line(lines[i], path.parent, processor) if lines[i].strip() else None)
        except ValueError as e:
            mine.append(str(e))
    shards = M.gather(mine)
    items, n_bad, n_long = [], 0, 0
    for i in range(len(lines)):
        r, where = shards[i % world][i // world], f"{path}:{i + 1}"
        if isinstance(r, str) and strict:
            raise ValueError(f"{where}: {r}")
        if isinstance(r, str):
            log(f"{where}: skipped: {r}")
            n_bad += 1
        elif r and max_len and r["length"] > max_len:
            n_long += 1
        elif r:
            items.append(dict(r, where=where, file=str(path), offset=offsets[i]))
    log(f"data {path}: {len(items)} trajectories, {n_bad} bad lines skipped, "
        f"{n_long} longer than {max_len} tokens skipped")
    return items


def render_item(x, processor):
    """A record of load_sft -> model.render's dict. A line or image changed since the scan is an error:
    the batches and token counts that every rank planned with would no longer hold."""
    with open(x["file"], "rb") as f:
        f.seek(x["offset"])
        line = f.readline()
    try:
        row, images, sha = read_line(line, Path(x["file"]).parent)
    except ValueError as e:
        raise ValueError(f"{x['where']}: {e} (it was fine when the run started)") from None
    if sha != x["digest"]:
        raise ValueError(f"{x['where']}: the line or its images changed since the run started; restart it")
    return M.render(processor, row["messages"], images)


def data_fingerprint(items):
    """Changes with any byte of a kept line or its images, or how it tokenises: a resume needs the same."""
    return hashlib.sha1("".join(f"{x['id']}:{x['length']}:{x['n_trained']}:{x['digest']};"
                                for x in items).encode()).hexdigest()[:16]


def hold_out(items, n, seed):
    """-> (train, held_out): n random items (at most a tenth) held out."""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    held = set(idx[:min(n, len(items) // 10)])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def epoch_batches(n, global_batch, epoch, seed):
    """One epoch's global batches of item indices, a pure function of (seed, epoch) so that every rank
    and a resumed run see the same; the last partial batch is dropped."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    batches = [order[s:s + global_batch] for s in range(0, n // global_batch * global_batch, global_batch)]
    rng.shuffle(batches)
    return batches


def micro_batches(batch, lengths, micro, rank=0, world=1):
    """This rank's micro-batches of a batch: sorted by length, cut, dealt round-robin to the ranks."""
    order = sorted(batch, key=lambda j: lengths[j])
    return [order[s:s + micro] for s in range(0, len(order), micro)][rank::world]


def agent_questions(args, log):
    """-> (questions, tools) for agent accuracy, or None: a fixed sample of questions_eval.jsonl beside
    --data, the same at every evaluation so that accuracies compare over the run."""
    qfile, qs = Path(args.data).parent / "questions_eval.jsonl", []
    if args.agent_eval_n and qfile.is_file():
        with contextlib.suppress(ValueError):  # no usable question in it
            qs = T.load_questions(qfile)
    if args.agent_eval_n and not qs:
        log(f"agent accuracy unavailable: no questions in {qfile}")
    if not qs:
        return None
    return random.Random(args.seed).sample(qs, min(args.agent_eval_n, len(qs))), S.make_tools(str(qfile.parent))


# ----------------------------------------------------------------------------- loss, schedule, evaluation

def micro_loss(logp, mask, n_tokens, world):
    """logp, mask: (B, T) -> (loss to backpropagate, summed NLL). Dividing by the global batch's trained
    tokens weighs every token the same however the batch is split; `world` undoes DDP / FSDP's mean."""
    nll = -(logp * mask).sum()
    return nll * (world / n_tokens), nll.detach()


def forward_backward(wrapped, items, gb, processor, micro, device, dtype, rank, world):
    """Gradients of this rank's share of global batch `gb` (item indices) -> its loss over all ranks."""
    n_tok = sum(items[j]["n_trained"] for j in gb)  # of the whole global batch: every rank knows it
    mbs, nll = micro_batches(gb, [x["length"] for x in items], micro, rank, world), 0.0
    for k, mb in enumerate(mbs):
        batch = M.to_device(M.collate([render_item(items[j], processor) for j in mb], processor), device)
        with training.grad_sync(wrapped, k == len(mbs) - 1):  # DDP all-reduces after the last micro-batch only
            with M.autocast(device, dtype):
                logp = wrapped(batch)  # (B, T) log p of each trained token, 0 elsewhere
            loss, part = micro_loss(logp, batch["loss_mask"], n_tok, world)
            loss.backward()
        nll += part.item()
    (nll,) = M.reduce([nll])
    return nll / n_tok


def lr_factor(step, total, warmup, min_ratio):
    """Linear warmup over `warmup` steps, then cosine from 1 to min_ratio at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(wrapped, held, processor, agent, micro, device, dtype, rank, world, seed):
    """-> (held-out NLL per trained token over all ranks, log line with agent accuracy when `agent`).
    Every rank runs as many forwards (FSDP2 gathers in lockstep): one short of work repeats a micro-batch."""
    wrapped.eval()
    chunks = micro_batches(range(len(held)), [x["length"] for x in held], micro)
    nll, n = 0.0, 0.0
    for k in range(-(-len(chunks) // world)):
        c = rank + k * world
        batch = M.collate([render_item(held[j], processor) for j in chunks[min(c, len(chunks) - 1)]], processor)
        batch = M.to_device(batch, device)
        with M.autocast(device, dtype):
            logp = wrapped(batch)  # (B, T)
        if c < len(chunks):
            nll -= (logp * batch["loss_mask"]).sum().item()
            n += batch["loss_mask"].sum().item()
    nll, n = M.reduce([nll, n])
    line = f"loss {nll / max(n, 1):.6f} | trajectories {len(held)}"
    if agent:
        rng = training.rng_states()  # generation must not shift the training run's random streams
        with training.unsharded(wrapped) as model:  # ranks decode independently on whole weights
            records, _ = E.evaluate("agent", model, processor, agent[1], agent[0], "sft", rank=rank, world=world,
                                    max_new_tokens=64, seed=seed, progress=False, dtype=dtype)
        training.set_rng_states(rng)
        line += f" | agent_acc {E.metrics(records)['accuracy']:.4f} (n={len(agent[0])})"
    wrapped.train()
    return nll / max(n, 1), line


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = get_args(argv)
    rank, world, device, log, resume = training.start_run(args)
    out, dtype = Path(args.out), M.compute_dtype(args.precision, device)
    meta_file = Path(args.model) / "meta.json"
    tiny = meta_file.is_file() and bool(json.loads(meta_file.read_text()).get("tiny"))
    model, processor = training.load_trainable(args, args.model, resume, device, dtype, log, args.freeze_vision)
    model.train()

    # The data and the plan: every rank knows every batch; a resumed run must find the same plan.
    try:
        items = load_sft(args.data, processor, args.strict, args.max_len, log, rank, world)
    except ValueError as e:
        raise SystemExit(f"sft.py: {e}") from None
    items, held = hold_out(items, args.eval_n, args.seed)
    G, micro = args.batch_size, args.micro_batch
    if G % (micro * world):
        raise SystemExit(f"sft.py: --batch_size {G} is not a multiple of micro_batch x world = {micro} x {world}")
    per_epoch = len(items) // G
    if per_epoch == 0:
        raise SystemExit(f"sft.py: {len(items)} training trajectories, fewer than one global batch ({G})")
    total = min(args.epochs * per_epoch, args.max_steps or math.inf)
    warmup = math.ceil(args.warmup_ratio * total)
    plan = {"data": data_fingerprint(items), "batch_size": G, "seed": args.seed, "total": total, "per_epoch": per_epoch}

    # The optimizer, and where a resumed run stands (a resumed run restores every rank's RNG states)
    lr = args.lr if args.lr is not None else 1e-4 if args.lora_rank else 2e-3 if tiny else 1e-5
    mode = "fsdp" if args.fsdp else "ddp"
    wrapped = training.wrap(model, mode, device, dtype)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, args.min_lr_ratio))
    start, skipped, consecutive = 0, 0, 0
    if resume:
        start, extra = training.load_train_state(out, opt, sched, model=wrapped)
        if extra["plan"] != plan:
            raise SystemExit(f"sft.py: cannot resume exactly: the run in {out} had plan {extra['plan']}, "
                             f"this one {plan} (same data, batch size, seed and schedule needed)")
        skipped, consecutive = extra["skipped"], extra["consecutive"]
    else:
        torch.manual_seed(args.seed + rank)
    log(f"sft: {len(items)} train / {len(held)} held-out trajectories, world {world} ({mode}), "
        f"compute {dtype}, attention {model.config._attn_implementation}, "
        f"global batch {G} = micro {micro} x accum {G // (micro * world)} x world {world}, {per_epoch} steps/epoch, "
        f"{total} steps, warmup {warmup}, lr {lr:g}, trainable {sum(p.numel() for p in params) / 1e6:.2f}M"
        f"{f' (LoRA r={args.lora_rank})' if args.lora_rank else ''}, "
        f"{'resuming at step %d' % start if resume else 'fresh'}")
    agent = agent_questions(args, log)

    meta = {"stage": "sft", "base": str(args.model), "tiny": tiny, "lora_rank": args.lora_rank, "config": vars(args)}
    end = min(total, start + args.stop_after_steps) if args.stop_after_steps else total  # a clean stop, resumable
    t_run, step, losses, last_eval = time.time(), start, [], None
    for step in range(start + 1, end + 1):
        epoch, i = divmod(step - 1, per_epoch)
        if step == start + 1 or i == 0:
            batches = epoch_batches(len(items), G, epoch, args.seed)
        gb, t0 = batches[i], time.time()
        loss_val = forward_backward(wrapped, items, gb, processor, micro, device, dtype, rank, world)
        gnorm = training.clip_grad_norm(params, 1.0)
        good = math.isfinite(loss_val) and math.isfinite(gnorm)
        if good:  # else the update is skipped; the batch is consumed and the LR schedule moves on
            opt.step()
        skipped, consecutive = skipped + (not good), 0 if good else consecutive + 1
        opt.zero_grad(set_to_none=True)
        cur_lr = sched.get_last_lr()[0]
        sched.step()
        losses.append(loss_val)
        mem = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)  # Linux reports KiB
        log(f"step {step}/{total} | epoch {step / per_epoch:.2f} | loss {loss_val:.6f} | lr {cur_lr:.3e} | "
            f"tok/s {sum(items[j]['length'] for j in gb) / (time.time() - t0):.0f} | gnorm {gnorm:.4f} | "
            f"mem {mem:.2f}GB | skipped {skipped}")
        if consecutive >= args.max_bad_steps:
            last = json.loads((out / "meta.json").read_text())["step"] if (out / "meta.json").is_file() else None
            msg = (f"sft.py: {consecutive} non-finite steps in a row (loss {loss_val}, grad norm {gnorm}) at step "
                   f"{step}: aborting. Last good checkpoint: "
                   f"{f'{out} (step {last}), untouched' if last is not None else 'none written yet'}. "
                   "Lower --lr or check the data.")
            log(msg)
            raise SystemExit(msg)
        if held and (step == total or (args.eval_every and step % args.eval_every == 0)):
            last_eval, line = evaluate(wrapped, held, processor, agent, micro, device, dtype, rank, world, args.seed)
            log(f"eval step {step} | {line}")
        if step == end or (args.save_every and step % args.save_every == 0 and consecutive == 0):
            training.save_checkpoint(wrapped, processor, out, dict(meta, eval_loss=last_eval), opt, sched, step,
                                     {"plan": plan, "skipped": skipped, "consecutive": consecutive})
            log(f"saved {out} at step {step}")
    if step < total:
        log(f"stopped at step {step}/{total}; continue with --resume")
    else:
        log(f"done: {total} steps in {(time.time() - t_run) / 60:.1f} min, {skipped} skipped, "
            f"last loss {losses[-1] if losses else float('nan'):.4f}, held-out loss {last_eval}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"step": step, "losses": losses, "eval_loss": last_eval, "skipped": skipped}


if __name__ == "__main__":
    main()
