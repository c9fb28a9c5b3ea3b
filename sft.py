"""sft.py: cold-start supervised fine-tuning on multi-turn tool-use trajectories (stage 1).

Reads SFT trajectories (JSONL: {"id", "images": [paths relative to the file], "messages": [...]}),
scans them once for their lengths, then renders each micro-batch when it is needed with model.render
(the loss falls only on what the assistant writes: its reasoning, its action and the closing
<|im_end|>; never on <information> tool results, user text or image tokens), and trains, fully or
with LoRA.
The loss of a step is the mean negative log-likelihood over every trained token of the global
batch, however the batch is split into micro-batches and ranks: 1 process and N give the same numbers.

    python sft.py                                     # tiny model (data/tiny) on data/sft.jsonl, CPU, minutes
    python sft.py --resume                            # continue out/sft exactly where it stopped
    torchrun --standalone --nproc_per_node=2 sft.py   # DDP (gloo on CPU, NCCL on GPUs)
    torchrun --standalone --nproc_per_node=8 sft.py --fsdp --grad_ckpt \\
        --model /path/to/Qwen2.5-VL-7B-Instruct --data /path/to/sft.jsonl --out out/sft_7b \\
        --epochs 3 --batch_size 64 --micro_batch 1 --max_len 8192      # full fine-tuning, FSDP2
    torchrun --standalone --nproc_per_node=8 sft.py --lora_rank 8 --grad_ckpt \\
        --model /path/to/Qwen2.5-VL-7B-Instruct --data /path/to/sft.jsonl --out out/sft_7b_lora \\
        --epochs 3 --batch_size 64 --micro_batch 2    # the paper's recipe: LoRA r=8, LR 1e-4, cosine,
                                                      # warmup ratio 0.1, 3 epochs, vision frozen

Outputs in --out: the checkpoint (Hugging Face layout, fp32, LoRA folded in, and a LoRA run's adapter
in PEFT's layout in adapter/; model.save_checkpoint), log.txt (the run header, one line per step,
eval lines) and train_state.pt (optimizer, scheduler, RNG and data position, for --resume). Global batch = micro_batch x accumulation x world size.
"""
import argparse
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
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

import eval as E
import model as M
import tools as T


def get_args(argv=None):
    p = argparse.ArgumentParser(description="cold-start SFT on multi-turn tool-use trajectories",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="data/tiny", help="checkpoint folder to start from (tiny or real Qwen2.5-VL)")
    p.add_argument("--data", default="data/sft.jsonl", help="SFT trajectories JSONL")
    p.add_argument("--eval_data", default=None,
                   help="held-out trajectories JSONL; default: sft_eval.jsonl beside --data if it exists, "
                        "else --eval_n examples held out of --data")
    p.add_argument("--eval_n", type=int, default=64, help="examples held out of --data when there is no eval file "
                   "(at most a tenth of the data; 0: no held-out loss)")
    p.add_argument("--out", default="out/sft", help="output folder: checkpoint, log.txt, train_state.pt")
    p.add_argument("--strict", action="store_true", help="a bad JSONL line is fatal instead of skipped")
    p.add_argument("--max_len", type=int, default=4096, help="skip (and count) trajectories longer than this")
    # optimisation
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max_steps", type=int, default=0, help="cap on optimizer steps (0: epochs decide); "
                   "sets the length of the LR schedule")
    p.add_argument("--batch_size", type=int, default=16, help="global batch in trajectories")
    p.add_argument("--micro_batch", type=int, default=8, help="trajectories per forward per rank")
    p.add_argument("--lr", type=float, default=None, help="peak LR; default 1e-4 with LoRA (the paper), "
                   "2e-3 for full fine-tuning of a tiny model, 1e-5 for full fine-tuning of a real one")
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--min_lr_ratio", type=float, default=0.0, help="cosine decays to lr x this")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decay on matrices only")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max global grad norm (0: no clipping)")
    p.add_argument("--max_bad_steps", type=int, default=5,
                   help="abort after this many non-finite steps in a row (each one is skipped)")
    p.add_argument("--group_by_length", action="store_true",
                   help="global batches of similar lengths (less padding). Off by default: lengths follow the "
                   "question kind, so such batches hold one kind each and the model never sees, within a step, "
                   "the contrast that decides search vs answer (measured: it then ignores the question)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default); "
                   "1 is fastest for tiny models on a busy machine")
    # what trains
    p.add_argument("--lora_rank", type=int, default=0, help="LoRA rank on the language model (0: full fine-tuning)")
    p.add_argument("--lora_alpha", type=float, default=16.0)
    p.add_argument("--freeze_vision", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze the vision tower and projector, as the paper does (LoRA freezes them anyway); "
                        "the tiny model's sight comes from make_data's caption warm-up, which unfrozen SFT "
                        "mostly forgets (search-free direct answer 50.0 vs 86.7, measured)")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in the decoder and vision blocks")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 sharding per block instead of DDP (for 7B)")
    p.add_argument("--precision", choices=sorted(M.PRECISIONS), default=None,
                   help="compute precision (default bf16 on CUDA, fp32 on CPU); trainable weights and optimizer "
                   "state are fp32 masters, a LoRA run's frozen base is kept in the compute dtype")
    p.add_argument("--max_pixels", type=int, default=None, help="image size cap (default: the checkpoint's, "
                   "at most 1280x28x28 for real ones)")
    # evaluation, checkpoints, stopping
    p.add_argument("--eval_every", type=int, default=250, help="held-out loss every N steps and at the end (0: end only)")
    p.add_argument("--agent_eval_n", type=int, default=16,
                   help="questions for agent accuracy through eval.py at each evaluation (0: off)")
    p.add_argument("--agent_questions", default=None,
                   help="question JSONL for agent accuracy; default: questions_eval.jsonl beside --data")
    p.add_argument("--agent_max_new_tokens", type=int, default=64, help="per assistant turn in agent evaluation")
    p.add_argument("--save_every", type=int, default=250, help="checkpoint every N steps and at the end (0: end only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--max_minutes", type=float, default=0, help="stop cleanly (checkpoint, resumable) after this long")
    p.add_argument("--stop_after_steps", type=int, default=0,
                   help="stop cleanly after N steps of this invocation, as if preempted (the schedule is unchanged)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data
# Trajectories are rendered lazily. At start each rank scans its share of the lines (r::world) for
# what batching needs, each trajectory's token length and trained-token count, and the ranks share
# these small results, so every rank plans the same batches. A micro-batch then renders (decodes and
# tokenises) only its own trajectories: no pixels are held between steps, and no line is scanned twice.
# The scan decodes every image fully, once, on the scanning rank, so a truncated file whose header is
# fine is a bad line for all ranks at start instead of a crash (or a missing trajectory, which would
# change the loss normalisation) in the middle of a run. Measured on data/sft.jsonl (4000 lines, one
# small PNG each): decoding adds 0.08 ms a line to a scan of about 1.3 ms, most of it tokenising.

class BadLine(ValueError):
    pass


def parse_line(line, base_dir):
    """One JSONL line (str or bytes) -> (row, image files), or BadLine saying what is wrong with it.
    The images are not opened (open_image does that)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(f"not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise BadLine("not valid UTF-8") from None
    if not isinstance(row, dict):
        raise BadLine("not a JSON object")
    for k in ("id", "images", "messages"):
        if k not in row:
            raise BadLine(f"missing field {k!r}")
    msgs, paths = row["messages"], row["images"]
    if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths):
        raise BadLine("'images' is not a list of paths")
    if not isinstance(msgs, list) or not msgs:
        raise BadLine("'messages' is not a non-empty list")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise BadLine(f"bad message {str(m)[:80]!r} (want role system|user|assistant, string content)")
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadLine("no assistant message: nothing to train on")
    n_ph = sum(m["content"].count(M.IMAGE) for m in msgs)
    if n_ph != len(paths):
        raise BadLine(f"{n_ph} {M.IMAGE} placeholders but {len(paths)} images")
    return row, [Path(base_dir) / rel for rel in paths]


def open_image(f):
    """Image file -> (decoded RGB PIL image, the file's bytes), or BadLine."""
    try:
        data = f.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB"), data  # convert() decodes fully: a truncated file fails here
    except FileNotFoundError:
        raise BadLine(f"image not found: {f}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadLine(f"corrupt image {f} ({e})") from None


def image_grid(image_processor, width, height):
    """[t, h, w] patch grid of a width x height image by the image processor's own resize rule
    (smart_resize with its patch size, merge size and min / max pixels), from the size alone."""
    ip = image_processor
    h, w = smart_resize(height, width, factor=ip.patch_size * ip.merge_size,
                        min_pixels=ip.size.shortest_edge, max_pixels=ip.size.longest_edge)
    return [1, h // ip.patch_size, w // ip.patch_size]


class _SizesOnly:
    """The processor, except that images() gives the patch grids known from the images' sizes and no
    pixels: model.render, the one place that builds ids and loss masks, then tokenises a trajectory
    exactly without resizing and normalising its images."""

    def __init__(self, processor, grids):
        self.processor, self.grids = processor, grids

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def images(self, images):
        return None, (torch.tensor(self.grids) if self.grids else None)


def _digest(line, image_bytes):
    h = hashlib.sha1(line)
    for b in image_bytes:
        h.update(b)
    return h.hexdigest()


def scan_line(line, base_dir, processor):
    """One JSONL line (bytes) -> {id, length, n_trained, digest} (digest: of the line and its images'
    bytes), or BadLine. Pixels are decoded to check them, then dropped."""
    row, files = parse_line(line, base_dir)
    images = [open_image(f) for f in files]
    try:
        grids = [image_grid(processor.image_processor, *im.size) for im, _ in images]
        r = M.render(_SizesOnly(processor, grids), row["messages"], [im for im, _ in images])
    except ValueError as e:
        raise BadLine(f"cannot render ({e})") from None
    return {"id": str(row["id"]), "length": len(r["input_ids"]), "n_trained": int(r["loss_mask"].sum()),
            "digest": _digest(line, [b for _, b in images])}


def load_sft(path, processor, strict=False, max_len=None, log=print, progress=False, rank=0, world=1):
    """Scan a JSONL file of trajectories -> list of small records {id, where (path:lineno), file, offset,
    length, n_trained, digest}, the same list on every rank; render_item renders one when needed.
    Rank r scans lines r::world; with world > 1 this is a collective (all_gather_object).
    A bad line is logged as path:lineno and skipped (strict: ValueError naming path:lineno, raised on
    every rank alike); trajectories over max_len tokens are skipped and counted."""
    path = Path(path)
    with open(path, "rb") as f:
        lines = f.readlines()  # split at b"\n" only, JSONL's rule, so byte offsets and line numbers hold
    offsets = list(itertools.accumulate(map(len, lines), initial=0))
    mine = range(rank, len(lines), world)
    if progress:
        mine = tqdm(mine, desc=f"scan {path.name}", leave=False)
    results = []  # per line of mine: a record, the reason it is bad, or None for a blank line
    for i in mine:
        try:
            results.append(scan_line(lines[i], path.parent, processor) if lines[i].strip() else None)
        except BadLine as e:
            results.append(str(e))
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, results)
        results = [shards[i % world][i // world] for i in range(len(lines))]
    items, n_bad, n_long = [], 0, 0
    for i, r in enumerate(results):
        where = f"{path}:{i + 1}"
        if isinstance(r, str):
            if strict:
                raise ValueError(f"{where}: {r}")
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
    """A record of load_sft -> model.render's dict (input_ids, loss_mask, pixel_values, image_grid_thw),
    rendered now. A line or image that changed since the scan is an error: the batches and token counts
    that every rank planned with would no longer hold."""
    with open(x["file"], "rb") as f:
        f.seek(x["offset"])
        line = f.readline()
    try:
        row, files = parse_line(line, Path(x["file"]).parent)
        images = [open_image(f) for f in files]
    except BadLine as e:
        raise ValueError(f"{x['where']}: {e} (it was fine when the run started)") from None
    if _digest(line, [b for _, b in images]) != x["digest"]:
        raise ValueError(f"{x['where']}: the line or its images changed since the run started; restart it")
    return M.render(processor, row["messages"], [im for im, _ in images])


def hold_out(items, n, seed):
    """Split off n random items (at most a tenth) as a held-out set -> (train, held_out)."""
    n = min(n, len(items) // 10)
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    held = set(idx[:n])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def epoch_batches(lengths, global_batch, epoch, seed, group_by_length=False, window=50):
    """The global batches of one epoch: lists of item indices, a pure function of (seed, epoch), so
    every rank and a resumed run see the same order. The last partial batch is dropped (every step
    has the same size). Grouping by length sorts inside windows of `window` global batches: each
    batch holds similar lengths (little padding) while the batch order stays random."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order = order[:len(order) // global_batch * global_batch]
    if group_by_length:
        w = window * global_batch
        order = [j for s in range(0, len(order), w) for j in sorted(order[s:s + w], key=lambda j: lengths[j])]
    batches = [order[s:s + global_batch] for s in range(0, len(order), global_batch)]
    rng.shuffle(batches)
    return batches


def rank_micro_batches(batch, lengths, micro, rank, world):
    """This rank's micro-batches of one global batch: sorted by length, cut into micro-batches,
    dealt round-robin, so the ranks' k-th micro-batches have similar lengths."""
    order = sorted(batch, key=lambda j: lengths[j])
    chunks = [order[s:s + micro] for s in range(0, len(order), micro)]
    return chunks[rank::world]


def data_fingerprint(items):
    """Changes when the training data change (any byte of a kept line or its images, or how it
    tokenises): a resume must see the same data."""
    h = hashlib.sha1()
    for x in items:
        h.update(f"{x['id']}:{x['length']}:{x['n_trained']}:{x['digest']};".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- loss and schedule

def micro_loss(logp, mask, n_tokens, world):
    """logp, mask: (B, T). Returns (loss to backpropagate, summed NLL for the log). Dividing by the
    global batch's trained-token count (not this micro-batch's) weighs every token the same however
    the batch is split; the factor `world` undoes DDP's and FSDP's averaging of gradients over ranks."""
    nll = -(logp * mask).sum()
    return nll * (world / n_tokens), nll.detach()


def lr_lambda(total, warmup, min_ratio=0.0):
    """Linear warmup over `warmup` steps, then cosine from 1 to min_ratio at step `total`."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def default_lr(args, tiny):
    if args.lr is not None:
        return args.lr
    return 1e-4 if args.lora_rank else (2e-3 if tiny else 1e-5)


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def eval_loss(wrapped, items, processor, micro, device, dtype, rank, world):
    """Mean NLL per trained token of the held-out set, over all ranks. Every rank runs the same
    number of forwards (FSDP2 gathers parameters in lockstep); a rank short of work repeats a
    micro-batch and ignores it."""
    order = sorted(range(len(items)), key=lambda j: items[j]["length"])
    chunks = [order[s:s + micro] for s in range(0, len(order), micro)]
    nll, n = 0.0, 0.0
    for k in range(-(-len(chunks) // world)):
        c = rank + k * world
        mb = chunks[min(c, len(chunks) - 1)]
        batch = M.to_device(M.collate([render_item(items[j], processor) for j in mb], processor), device)
        with M.autocast(device, dtype):
            logp = wrapped(batch)  # (B, T)
        if c < len(chunks):
            nll -= (logp * batch["loss_mask"]).sum().item()
            n += batch["loss_mask"].sum().item()
    nll, n = M.reduce([nll, n])
    return nll / max(n, 1)


def agent_setup(args, log):
    """(questions, tools) of the agent evaluation: a fixed random sample of held-out questions (the
    same at every evaluation, so accuracies are comparable over the run), or None."""
    if not args.agent_eval_n:
        return None
    qfile = Path(args.agent_questions or Path(args.data).parent / "questions_eval.jsonl")
    try:
        qs = T.load_questions(qfile) if qfile.is_file() else []
    except ValueError:  # no usable question in it
        qs = []
    if not qs:
        log(f"agent accuracy unavailable: no questions in {qfile}")
        return None
    return random.Random(args.seed).sample(qs, min(args.agent_eval_n, len(qs))), T.make_tools(str(Path(args.data).parent))


def agent_accuracy(wrapped, processor, agent, args, rank, world, dtype):
    """Agent accuracy (greedy, on-demand search) through eval.py, the questions sharded over ranks;
    under FSDP2 on gathered weights (M.unsharded), so ranks decode independently."""
    questions, tools = agent
    with M.unsharded(wrapped) as model:
        records, _ = E.evaluate("agent", model, processor, tools, questions, "sft", rank=rank, world=world,
                                max_new_tokens=args.agent_max_new_tokens, seed=args.seed, progress=False,
                                dtype=dtype)
    return E.metrics(records)["accuracy"]


# ----------------------------------------------------------------------------- model

def build_model(args, device, dtype, resume, log):
    """Load, set what trains (LoRA / frozen vision), gradient checkpointing -> (model, processor, tiny).
    Trainable weights are fp32 masters; a LoRA run's frozen base is loaded in the compute dtype.
    Full fine-tuning resumes from the run's saved weights, LoRA from the base plus the saved adapter."""
    meta_file = Path(args.model) / "meta.json"
    tiny = bool(json.loads(meta_file.read_text()).get("tiny")) if meta_file.is_file() else False
    path = args.out if resume and not args.lora_rank else args.model
    model, processor = M.load(path, device=device, dtype=dtype if args.lora_rank else torch.float32, log=log,
                              max_pixels=args.max_pixels)
    torch.manual_seed(args.seed)  # the same LoRA init on every rank (FSDP2 does not broadcast it)
    if args.lora_rank:
        M.add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)  # LoRA factors are fp32
        if resume:
            M.load_adapter(model, args.out)
    if args.freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, processor, tiny


def make_optimizer(params, lr, weight_decay):
    """AdamW; decay on matrices only (norm weights and biases keep theirs)."""
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999), eps=1e-8)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = M.setup_dist()
    out = Path(args.out)
    if rank == 0:
        M.recover(out)  # finish a checkpoint swap that a kill interrupted
    M.barrier()
    log = M.RunLog(out / "log.txt", args)
    try:
        return train(args, rank, world, device, log)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device, log):
    out = Path(args.out)
    state_file = out / M.TRAIN_STATE
    resume = args.resume and state_file.is_file()
    if args.resume and not resume:
        log(f"--resume: no {state_file}, starting fresh")
    dtype = M.compute_dtype(args.precision, device)
    model, processor, tiny = build_model(args, device, dtype, resume, log)

    # Data: scanned once for lengths (sharded over ranks); each micro-batch renders its own trajectories.
    load = dict(processor=processor, strict=args.strict, max_len=args.max_len, log=log, progress=world == 1,
                rank=rank, world=world)
    try:
        items = load_sft(args.data, **load)
        if args.eval_data and not Path(args.eval_data).is_file():
            raise SystemExit(f"sft.py: --eval_data {args.eval_data}: file not found")
        eval_file = args.eval_data or (Path(args.data).parent / "sft_eval.jsonl")
        if Path(eval_file).is_file():
            train_items, held = items, load_sft(eval_file, **load)
        else:
            train_items, held = hold_out(items, args.eval_n, args.seed)
    except ValueError as e:
        raise SystemExit(f"sft.py: {e}") from None
    lengths = [x["length"] for x in train_items]
    n_trained = [x["n_trained"] for x in train_items]

    G, micro = args.batch_size, args.micro_batch
    if G % (micro * world):
        raise SystemExit(f"sft.py: --batch_size {G} is not a multiple of micro_batch x world = {micro} x {world}")
    accum = G // (micro * world)
    per_epoch = len(train_items) // G
    if per_epoch == 0:
        raise SystemExit(f"sft.py: {len(train_items)} training trajectories, fewer than one global batch ({G})")
    total = args.epochs * per_epoch
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = math.ceil(args.warmup_ratio * total)
    lr = default_lr(args, tiny)

    mode = "fsdp" if args.fsdp else "ddp"
    wrapped = M.wrap(model, mode, device, dtype)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr, args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup, args.min_lr_ratio))
    plan = {"data": data_fingerprint(train_items), "batch_size": G, "seed": args.seed, "total": total,
            "per_epoch": per_epoch, "group_by_length": args.group_by_length}
    start, skipped, consecutive = 0, 0, 0
    if resume:
        start, extra = M.load_train_state(out, opt, sched, model=wrapped)
        if extra["plan"] != plan:
            raise SystemExit(f"sft.py: cannot resume exactly: the run in {out} had plan {extra['plan']}, "
                             f"this one {plan} (same data, batch size, seed and schedule needed)")
        skipped, consecutive = extra["skipped"], extra["consecutive"]
    if not resume:  # a resumed run restores every rank's RNG state instead
        torch.manual_seed(args.seed + rank)

    n_train = sum(p.numel() for p in params)
    log(f"sft: {len(train_items)} train / {len(held)} held-out trajectories, world {world} ({mode}), "
        f"compute {dtype}, attention {model.config._attn_implementation}, "
        f"global batch {G} = micro {micro} x accum {accum} x world {world}, {per_epoch} steps/epoch, "
        f"{total} steps, warmup {warmup}, lr {lr:g}, trainable {n_train / 1e6:.2f}M"
        f"{f' (LoRA r={args.lora_rank})' if args.lora_rank else ''}, {'resuming at step %d' % start if resume else 'fresh'}")
    meta = {"stage": "sft", "base": str(args.model), "tiny": tiny, "lora_rank": args.lora_rank,
            "config": vars(args)}

    agent = agent_setup(args, log)

    def state_extra():
        return {"plan": plan, "skipped": skipped, "consecutive": consecutive}

    t_run, step, batches, batches_epoch, losses, last_eval = time.time(), start, None, -1, [], None
    while step < total:
        epoch, i = divmod(step, per_epoch)
        if epoch != batches_epoch:
            batches = epoch_batches(lengths, G, epoch, args.seed, args.group_by_length)
            batches_epoch = epoch
        gb = batches[i]
        n_tok = sum(n_trained[j] for j in gb)  # trained tokens of the whole global batch: all ranks know it
        t0 = time.time()
        nll = 0.0
        mbs = rank_micro_batches(gb, lengths, micro, rank, world)
        for k, mb in enumerate(mbs):
            batch = M.to_device(M.collate([render_item(train_items[j], processor) for j in mb], processor), device)
            with M.grad_sync(wrapped, k == len(mbs) - 1):
                with M.autocast(device, dtype):
                    logp = wrapped(batch)  # (B, T) log p of each trained token, 0 elsewhere
                loss, part = micro_loss(logp, batch["loss_mask"], n_tok, world)
                loss.backward()
            nll += part.item()
        (nll,) = M.reduce([nll])
        loss_val = nll / n_tok
        gnorm = M.clip_grad_norm(params, args.grad_clip)
        if math.isfinite(loss_val) and math.isfinite(gnorm):
            opt.step()
            consecutive = 0
        else:  # skip the update; the batch is consumed and the LR schedule moves on
            skipped += 1
            consecutive += 1
        opt.zero_grad(set_to_none=True)
        cur_lr = sched.get_last_lr()[0]
        sched.step()
        step += 1
        losses.append(loss_val)
        dt = time.time() - t0
        log(f"step {step}/{total} | epoch {step / per_epoch:.2f} | loss {loss_val:.6f} | lr {cur_lr:.3e} | "
            f"tok/s {sum(lengths[j] for j in gb) / dt:.0f} | gnorm {gnorm:.4f} | "
            f"mem {memory_gb(device):.2f}GB | skipped {skipped}")
        if consecutive >= args.max_bad_steps:
            last = json.loads((out / "meta.json").read_text())["step"] if (out / "meta.json").is_file() else None
            msg = (f"sft.py: {consecutive} non-finite steps in a row (loss {loss_val}, grad norm {gnorm}) at step "
                   f"{step}: aborting. Last good checkpoint: "
                   f"{f'{out} (step {last}), untouched' if last is not None else 'none written yet'}. "
                   f"Lower --lr or check the data.")
            log(msg)
            raise SystemExit(msg)

        if step == total or (args.eval_every and step % args.eval_every == 0):
            last_eval = evaluate(wrapped, held, processor, agent, args, device, dtype, rank, world, step, log)
        stop = step < total and ((args.stop_after_steps and step - start >= args.stop_after_steps) or
                                 (args.max_minutes and time.time() - t_run > 60 * args.max_minutes))
        (stop,) = M.reduce([stop])  # every rank must agree to stop on the same step
        periodic = args.save_every and step % args.save_every == 0 and consecutive == 0  # only after a good step
        if step == total or stop or periodic:
            M.save_checkpoint(wrapped, processor, out, dict(meta, eval_loss=last_eval), opt, sched, step, state_extra())
            log(f"saved {out} at step {step}")
        if stop:
            log(f"stopped at step {step}/{total}; continue with --resume")
            break
    if step == total:
        log(f"done: {total} steps in {(time.time() - t_run) / 60:.1f} min, {skipped} skipped, "
            f"last loss {losses[-1] if losses else float('nan'):.4f}, held-out loss {last_eval}")
    return {"step": step, "losses": losses, "eval_loss": last_eval, "skipped": skipped}


def evaluate(wrapped, held, processor, agent, args, device, dtype, rank, world, step, log):
    """Held-out loss and agent accuracy on a sample of questions (every rank takes part)."""
    if not held:
        return None
    wrapped.eval()
    loss = eval_loss(wrapped, held, processor, args.micro_batch, device, dtype, rank, world)
    line = f"eval step {step} | loss {loss:.6f} | trajectories {len(held)}"
    if agent:
        rng = M.rng_states()  # generation must not shift the training run's random streams
        acc = agent_accuracy(wrapped, processor, agent, args, rank, world, dtype)
        M.set_rng_states(rng)
        line += f" | agent_acc {acc:.4f} (n={len(agent[0])})"
    wrapped.train()
    log(line)
    return loss


if __name__ == "__main__":
    main()
