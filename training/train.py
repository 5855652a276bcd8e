"""QLoRA training of an expert: 4-bit base (bitsandbytes), LoRA via peft, assistant-only loss.

Resuming continues the optimizer, the scheduler and the step exactly: the schedule's length
is fixed when a run starts and stored with every checkpoint, and the data order is a pure
function of (seed, epoch), so an interrupted-then-resumed run follows the same learning-rate
curve, batch by batch, as one that never stopped.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from models.base_model import EMBEDDED_BASE, base_stop_token_ids, load_model, resolve_base_folder
from training.chat_data import IGNORE, Example, load_chat_jsonl
from adapters.lora import LINEAR_MODULES, METADATA_FILE

CHECKPOINT = "checkpoint"


@dataclass
class TrainConfig:
    data: str
    name: str
    out: str
    validation_data: str | None = None  # chat JSONL scored at every checkpoint (valid_loss)
    base_model: str = EMBEDDED_BASE
    cache_dir: str | None = None
    quantization: str = "nf4"
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = LINEAR_MODULES
    epochs: int = 2
    steps: int | None = None  # planned total steps; default epochs * steps per epoch
    stop_after: int | None = None  # stop this run early (an interruption), keeping the plan
    batch_size: int = 8
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    max_length: int = 512
    seed: int = 0
    resume: bool = False
    checkpoint_every: int = 10
    description: str = ""
    examples: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    progress: bool = True


@dataclass
class TrainResult:
    steps_done: int
    total_steps: int
    lr_history: list[float]  # the learning rate used at each step, since step 0 (resumes included)
    losses: list[float]


def lr_lambda(total_steps: int, warmup_fraction: float):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batch_indices(step: int, count: int, batch_size: int, seed: int) -> list[int]:
    """The examples of a step: a per-epoch permutation that depends only on (seed, epoch)."""
    per_epoch = math.ceil(count / batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[offset * batch_size : (offset + 1) * batch_size]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)  # padding stays IGNORE by position
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _load_base(cfg: TrainConfig):
    from transformers import AutoTokenizer

    folder, _ = resolve_base_folder(cfg.base_model, cfg.cache_dir)
    return folder, AutoTokenizer.from_pretrained(folder), load_model(folder, cfg.quantization, torch.float32)


def _save_checkpoint(out: Path, peft_model, optimizer, scheduler, state: dict) -> None:
    from peft import get_peft_model_state_dict

    staging = out / f".{CHECKPOINT}-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.save({"adapter": get_peft_model_state_dict(peft_model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), **state}, staging / "state.pt")
    final = out / CHECKPOINT
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)  # a crash mid-save keeps the previous checkpoint


def save_half_precision(folder: Path) -> None:
    """Rewrite adapter_model.safetensors in float16: half the size to ship; the server computes
    in its own dtype either way."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


@torch.no_grad()
def validation_loss(peft_model, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Mean loss per learned token over the validation conversations."""
    was_training = peft_model.training
    peft_model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        learned = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(peft_model(**batch).loss) * learned
        tokens += learned
    peft_model.train(was_training)
    return total / max(1, tokens)


def train(cfg: TrainConfig, on_step=None, on_checkpoint=None) -> TrainResult:
    """on_step(step, total_steps, loss, lr) after each step; on_checkpoint(step, valid_loss or None) after
    each checkpoint is in place (a run killed after it resumes from there)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    folder, tokenizer, model = _load_base(cfg)
    end_ids = set(base_stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    examples = load_chat_jsonl(cfg.data, tokenizer, end_ids, cfg.max_length)
    held_out = load_chat_jsonl(cfg.validation_data, tokenizer, end_ids, cfg.max_length) if cfg.validation_data else []
    # the pad id only fills positions the attention mask and labels already exclude
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    step, lr_history, losses = 0, [], []
    checkpoint = out / CHECKPOINT / "state.pt"
    state = torch.load(checkpoint, weights_only=False) if cfg.resume and checkpoint.exists() else None
    if state is not None:
        total = state["total_steps"]  # the plan of the run that started it, not a new one
    # The scheduler is built before the optimizer state is loaded: building it rewrites the
    # optimizer's learning rate, and loading afterwards puts back the one in force at the stop.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, cfg.warmup_fraction))
    if state is not None:
        set_peft_model_state_dict(peft_model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, lr_history, losses = state["step"], state["lr_history"], state["losses"]

    last = total if cfg.stop_after is None else min(total, cfg.stop_after)
    peft_model.train()
    bar = tqdm(range(step, last), initial=step, total=total, desc=f"train {cfg.name}", disable=not cfg.progress)
    for step in bar:
        batch = collate([examples[i] for i in batch_indices(step, len(examples), cfg.batch_size, cfg.seed)], pad_id)
        loss = peft_model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr_history.append(optimizer.param_groups[0]["lr"])  # the rate this step really uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_history[-1]:.2e}")
        done = step + 1
        if on_step is not None:
            on_step(done, total, losses[-1], lr_history[-1])
        if done % cfg.checkpoint_every == 0 or done == last:
            _save_checkpoint(out, peft_model, optimizer, scheduler,
                             {"step": done, "total_steps": total, "lr_history": lr_history, "losses": losses})
            if on_checkpoint is not None:
                on_checkpoint(done, validation_loss(peft_model, held_out, cfg.batch_size, pad_id) if held_out else None)
    done = len(lr_history)
    if done == total:
        peft_model.save_pretrained(out, safe_serialization=True)
        save_half_precision(out)
        # expert.json is what POST /v1/adapters and the config take; training.json is the record
        (out / METADATA_FILE).write_text(json.dumps(
            {"name": cfg.name, "description": cfg.description, "examples": cfg.examples, "stop": cfg.stop}, indent=2))
        (out / "training.json").write_text(json.dumps(
            {"base_model": str(folder), "examples": len(examples), "steps": total, "batch_size": cfg.batch_size,
             "lr": cfg.lr, "rank": cfg.rank, "final_loss": losses[-1] if losses else None}, indent=2))
    return TrainResult(done, total, lr_history, losses)
