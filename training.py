"""training.py: what sft.py and rl.py share beyond model.py: LoRA (fp32 factors over any base, folded in
on save, PEFT's adapter layout), checkpoints (a Hugging Face folder written atomically with the train state
beside it, so `--resume` continues exactly after a kill -9), DDP / FSDP2 wrapping of `token_logprobs`
(whole weights for generation: `unsharded`), and a training run's start.
"""
import contextlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import model as M


# ----------------------------------------------------------------------------- LoRA

class LoRALinear(nn.Module):
    """y = W x + (alpha/r) B A x, B = 0 at start. `enabled = False`: the base alone (a LoRA run's KL reference)."""

    def __init__(self, base: nn.Linear, rank, alpha):
        super().__init__()
        self.base, self.rank, self.alpha, self.scale, self.enabled = base, rank, alpha, alpha / rank, True
        kw = dict(dtype=torch.float32, device=base.weight.device)  # trainable: fp32 masters over any base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        a, b = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(x.device.type):  # fp32 run or bf16 parameters: match x's dtype
            a, b = a.to(x.dtype), b.to(x.dtype)
        return y + F.linear(F.linear(x, a), b) * self.scale


def add_lora(model, rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj")):
    """Wrap the language model's linear layers named in `targets`; freeze everything else."""
    model.requires_grad_(False)
    for mod in list(model.model.language_model.modules()):
        for name, child in list(mod.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(mod, name, LoRALinear(child, rank, alpha))
    return model


def _lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def lora_disabled(model):
    """The base model, adapters off (the reference policy of a LoRA run, at no memory cost)."""
    mods = [m for _, m in _lora_layers(model)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def _full(t):
    """A parameter as a plain tensor; under FSDP2 an all-gather (every rank calls it, in the same order)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def merged_state_dict(model):
    """The state dict in the original layout, LoRA folded in, all fp32 (bf16 W + dW would round a small
    delta away). A collective under FSDP2; rank 0 gets the dict, others None."""
    sd, first, main = {}, {}, M.get_rank() == 0
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in first:  # a tied weight (lm_head = embed_tokens): one tensor, stored once
            if main:
                sd[k] = sd[first[id(v)]]
            continue
        first[id(v)], v = k, _full(v)
        if main:
            sd[k] = v.cpu().float() if v.is_floating_point() else v.cpu()
    if not main:
        return None
    for name, mod in _lora_layers(model):
        a, b = sd.pop(f"{name}.lora_A"), sd.pop(f"{name}.lora_B")
        sd[f"{name}.weight"] = sd.pop(f"{name}.base.weight") + (b @ a) * mod.scale
        if f"{name}.base.bias" in sd:
            sd[f"{name}.bias"] = sd.pop(f"{name}.base.bias")
    return sd


# The adapter lives in a subfolder: transformers with peft installed attaches an adapter_config.json
# found beside config.json on top of the weights, which would apply the (already merged) LoRA twice.
ADAPTER_DIR, ADAPTER_FILE, ADAPTER_CONFIG = "adapter", "adapter_model.safetensors", "adapter_config.json"


def lora_adapter(model, base=None):
    """(tensors, config) of the LoRA factors in PEFT's layout (fp32), or None without LoRA. A collective."""
    mods = _lora_layers(model)
    if not mods:
        return None
    tensors = {f"base_model.model.{name}.{k}.weight": _full(getattr(m, k)).float().cpu().contiguous()
               for name, m in mods for k in ("lora_A", "lora_B")}
    targets = sorted({n.rsplit(".", 1)[1] for n, _ in mods})
    return tensors, {"peft_type": "LORA", "task_type": None, "r": mods[0][1].rank, "lora_alpha": mods[0][1].alpha,
                     "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                     "base_model_name_or_path": str(base) if base else None,
                     # a regex: the vision tower has gate/up/down_proj too, which our LoRA leaves alone
                     "target_modules": rf".*language_model.*\.({'|'.join(targets)})"}


def load_adapter(model, path):
    """The adapter that `save_checkpoint` wrote (path/adapter/) into model's LoRA layers."""
    f = Path(path) / ADAPTER_DIR / ADAPTER_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (the LoRA factors of the run)")
    tensors, mods = load_file(str(f)), dict(_lora_layers(model))
    for key, t in tensors.items():
        name, k = key.removeprefix("base_model.model.").removesuffix(".weight").rsplit(".", 1)
        if name not in mods or k not in ("lora_A", "lora_B"):
            raise ValueError(f"{f}: {key} matches no LoRA layer of this model (other base or rank?)")
        with torch.no_grad():
            getattr(mods[name], k).copy_(t)
    if len(tensors) != 2 * len(mods):
        raise ValueError(f"{f}: {len(tensors)} tensors for {len(mods)} LoRA layers")


# ----------------------------------------------------------------------------- checkpoints

TRAIN_STATE = "train_state.pt"  # optimizer, scheduler, RNG, data position: beside the HF files, ignored by loaders
SIDE_FILES = ("log.txt",)  # a run's files in its checkpoint folder that are not part of the checkpoint


def save(model, processor, out_dir, meta, state_dict=None, train_state=None, adapter=None):
    """Atomic checkpoint (fp32 safetensors, processor files, meta.json, train state, LoRA adapter): written
    beside `out_dir` and swapped in as one unit, so a kill -9 at any moment leaves the old unit or the new
    one (`recover`). out_dir's SIDE_FILES are kept. `state_dict`: a gathered full state dict (FSDP)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary shared folder
    try:
        sd = state_dict if state_dict is not None else merged_state_dict(model)
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = "float32"  # what the tensors are; `dtype="auto"` loaders must not read bf16
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        processor.save_pretrained(tmp)
        if adapter is not None:
            (tmp / ADAPTER_DIR).mkdir()
            save_file(adapter[0], str(tmp / ADAPTER_DIR / ADAPTER_FILE), metadata={"format": "pt"})
            (tmp / ADAPTER_DIR / ADAPTER_CONFIG).write_text(json.dumps(adapter[1], indent=1))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        # side files -> .keep, out_dir -> .old, tmp -> out_dir, side files back: one rename each, `recover`
        # finishes from between any two
        keep, old = (out_dir.with_name(f".{out_dir.name}.{s}") for s in ("keep", "old"))
        if out_dir.exists():
            keep.mkdir(exist_ok=True)
            for name in SIDE_FILES:
                if (out_dir / name).exists():
                    os.replace(out_dir / name, keep / name)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        recover(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def recover(out_dir):
    """Finish a swap that a kill interrupted (rank 0, before anything reads out_dir)."""
    out_dir = Path(out_dir)
    keep, old = (out_dir.with_name(f".{out_dir.name}.{s}") for s in ("keep", "old"))
    if not out_dir.exists() and old.is_dir():
        os.replace(old, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep.is_dir():
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in keep.iterdir():
            os.replace(f, out_dir / f.name)
        keep.rmdir()


def rng_states():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(wrapped, processor, out_dir, meta, optimizer=None, scheduler=None, step=0, extra=None):
    """A training run's checkpoint from any wrapping (`save`): merged weights, a LoRA run's adapter, and the
    train state: optimizer, scheduler, every rank's RNG, `step` (the data position), `extra` (a picklable
    dict). A collective: every rank calls it; rank 0 writes."""
    model = unwrap(wrapped)
    sd, adapter, state = merged_state_dict(model), lora_adapter(model, meta.get("base")), None
    if optimizer is not None:
        opt = get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True)) if is_sharded(model) else optimizer.state_dict()
        state = {"step": step, "optimizer": opt, "scheduler": scheduler.state_dict() if scheduler else None,
                 "rng": M.gather(rng_states()), "extra": extra or {}}
    if M.get_rank() == 0:
        save(model, processor, out_dir, dict(meta, step=step), state_dict=sd, train_state=state, adapter=adapter)
    M.barrier()
    return Path(out_dir)


def load_train_state(out_dir, optimizer, scheduler, model=None):
    """Restore save_checkpoint's optimizer, scheduler and this rank's RNG -> (step, extra). Under FSDP2 rank 0
    reads the optimizer and sends each rank its shard; another world size restarts RNG from rank 0's."""
    path = Path(out_dir) / TRAIN_STATE
    s = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # ours: numpy RNG state inside
    if model is not None and is_sharded(unwrap(model)):
        set_optimizer_state_dict(model, optimizer, s["optimizer"] if M.get_rank() == 0 else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        optimizer.load_state_dict(s["optimizer"])
    if scheduler is not None and s["scheduler"] is not None:
        scheduler.load_state_dict(s["scheduler"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if len(s["rng"]) != world:
        M.print0(f"warning: {path} was saved by {len(s['rng'])} ranks, now {world}: RNG streams restart from rank 0's")
    set_rng_states(s["rng"][M.get_rank()] if len(s["rng"]) == world else s["rng"][0])
    return s["step"], s["extra"]


# ----------------------------------------------------------------------------- distributed training

class LogProbs(nn.Module):
    """token_logprobs as a module's forward, for DDP and FSDP2 to wrap (they act only inside a forward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, temperature=1.0, return_entropy=False):
        out = M.token_logprobs(self.model, batch, temperature, return_entropy=return_entropy)
        if not torch.is_grad_enabled():
            return out
        # A text-only micro-batch leaves a trainable vision tower without gradients, an empty trajectory every
        # parameter, while another rank's may use them: a zero term gives each one left out a gradient.
        lp = out[0] if return_entropy else out
        if not lp.requires_grad:
            idle = self.model
        elif batch.get("shared", batch).get("pixel_values") is None:
            idle = self.model.model.visual
        else:
            return out
        zero = sum((p.sum() for p in idle.parameters() if p.requires_grad), lp.new_zeros(())) * 0.0
        return (lp + zero, out[1]) if return_entropy else lp + zero


def wrap(model, mode="ddp", device=None, dtype=torch.float32):
    """-> w, w(batch, temperature, return_entropy) == token_logprobs(model, ...) with gradients averaged over
    ranks. ddp: whole model per rank. fsdp: FSDP2 on each decoder block, then the root (tied weights share
    it), gathered in `dtype`, reduced in fp32. none, or no process group: no wrapper."""
    root = LogProbs(model)
    if mode == "none" or not dist.is_initialized():
        return root
    device = torch.device(device or next(model.parameters()).device)
    if mode == "ddp":  # every trainable parameter gets a gradient (LogProbs); rotary tables are constants
        return DistributedDataParallel(root, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=False, broadcast_buffers=False)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
    # decoder blocks only: a vision unit would be gathered only by ranks whose micro-batch has images
    for block in model.model.language_model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    # FSDP2 picks its root at the first forward; the rollout's call into the blocks would make one a root
    root._get_fsdp_state()._lazy_init()
    return root


def unwrap(wrapped):
    """The Hugging Face model inside a `wrap` result (or the model itself)."""
    m = getattr(wrapped, "module", wrapped)  # DDP keeps it as .module
    return m.model if isinstance(m, LogProbs) else m


def is_sharded(model):
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def unsharded(wrapped):
    """Whole parameters and no collectives while ranks decode different numbers of steps: every FSDP2 unit
    gathered once, resharded on exit. A no-op for DDP and one process."""
    units = [m for m in wrapped.modules() if isinstance(m, FSDPModule)]
    for m in units:
        if m is not wrapped:  # the root's forward is never called by the rollout
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield unwrap(wrapped)
    finally:
        for m in units:
            m.reshard()
            if m is not wrapped:
                m.set_reshard_after_forward(True, recurse=False)


def grad_sync(wrapped, enabled):
    """DDP skips its all-reduce while accumulating (enabled=False); FSDP2 reduce-scatters every micro-batch."""
    return wrapped.no_sync() if not enabled and hasattr(wrapped, "no_sync") else contextlib.nullcontext()


def clip_grad_norm(params, max_norm):
    """Clip to `max_norm` (<= 0: no clipping) -> the global gradient norm (FSDP2: reduced over ranks)."""
    params = [p for p in params if p.grad is not None]  # none: norm 0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


# ----------------------------------------------------------------------------- a training run's start (sft.py, rl.py)

def start_run(args):
    """Threads, process group, --out's interrupted swap finished, run log -> (rank, world, device, log,
    resume): resume if --resume finds a train state (a job script may always pass --resume)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = M.setup_dist()
    out = Path(args.out)
    if rank == 0:
        recover(out)
    M.barrier()
    log = M.RunLog(out / "log.txt", args)
    resume = args.resume and (out / TRAIN_STATE).is_file()
    if args.resume and not resume:
        log(f"--resume: no {out / TRAIN_STATE}, starting fresh")
    return rank, world, device, log, resume


def load_trainable(args, path, resume, device, dtype, log, freeze_vision=True):
    """-> (model, processor): trainable weights fp32, a LoRA run's frozen base in `dtype`. A resume loads
    --out's weights, or for LoRA the base `path` plus the saved adapter. LoRA factors are drawn after
    torch.manual_seed(--seed), the same on every rank (FSDP2 does not broadcast them)."""
    out = Path(args.out)
    model, processor = M.load(out if resume and not args.lora_rank else path, device=device,
                            dtype=dtype if args.lora_rank else torch.float32, log=log, max_pixels=args.max_pixels)
    if args.lora_rank:
        torch.manual_seed(args.seed)
        add_lora(model, args.lora_rank)
        if resume:
            load_adapter(model, out)
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, processor

