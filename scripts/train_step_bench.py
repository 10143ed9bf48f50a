"""Training-step speed of the tagger on this machine, by attention dropout and precision.

Builds the tagger on a base checkpoint (random heads), then times forward, backward and the
AdamW step on random token batches of one shape, after warm-up steps; prints the median seconds
of each part per setting. What it is for: attention dropout above 0 takes PyTorch's CPU attention
off its fused kernel, and bf16 autocast only pays on CPUs with AMX (README, Training on your own
data).

  python scripts/train_step_bench.py --base ../shared/models/zh-bert-L6-H384
  python scripts/train_step_bench.py --base bert-base-chinese --batch 8 --length 256 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from transformers import AutoConfig

from newstagger.backends import cpu_bf16_units
from newstagger.cli import at_least, positive_int, thread_count
from newstagger.model import new_model, windows_past_positions
from newstagger.schema import LabelSchema
from training.train import set_attention_dropout

SCHEMA = LabelSchema(topics=["a", "b", "c", "d"], entity_types=[f"type{i}" for i in range(10)])


def time_steps(base: str, attention_dropout: float, bf16: bool, batch: int, length: int, steps: int,
               warmup: int) -> dict[str, float]:
    """Median seconds of forward, backward and optimizer step over `steps` timed steps."""
    torch.manual_seed(0)
    model = new_model(base, SCHEMA)
    set_attention_dropout(model, attention_dropout)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(1000, model.config.vocab_size, (batch, length))
    mask = torch.ones_like(ids)
    tags = torch.randint(0, len(SCHEMA.tags), (batch, length))
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    for step in range(warmup + steps):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            topic_logits, tag_logits = model(ids, mask)
        loss = F.cross_entropy(tag_logits.float().flatten(0, 1), tags.flatten()) + topic_logits.float().mean()
        forward_done = time.perf_counter()
        loss.backward()
        backward_done = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times["forward"].append(forward_done - started)
            times["backward"].append(backward_done - forward_done)
            times["optimizer"].append(time.perf_counter() - backward_done)
    return {part: statistics.median(values) for part, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="bert-base-chinese", help="BERT checkpoint: hub name or local folder")
    parser.add_argument("--batch", type=positive_int, default=8, help="rows per step")
    parser.add_argument("--length", type=positive_int, default=256, help="tokens per row")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed steps per setting")
    parser.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps first")
    parser.add_argument("--threads", type=thread_count, help="torch threads (default: torch's own)")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast (on any CPU)")
    args = parser.parse_args()
    base_config = AutoConfig.from_pretrained(args.base, trust_remote_code=False)
    if too_long := windows_past_positions(base_config, length=args.length):
        parser.error(f"--{too_long[0]} is more than the base's positions")
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = [False, True] if args.bf16 else [False]
    print(f"{args.base}, {args.batch} x {args.length} tokens, {torch.get_num_threads()} threads, "
          f"bf16 instructions: {cpu_bf16_units() or 'none'}, torch {torch.__version__}; median of {args.steps} steps")
    print("| attention dropout | precision | forward s | backward s | optimizer s | step s |")
    print("|---|---|---|---|---|---|")
    for bf16 in precisions:
        for attention_dropout in (0.1, 0.0):
            t = time_steps(args.base, attention_dropout, bf16, args.batch, args.length, args.steps, args.warmup)
            print(f"| {attention_dropout} | {'bf16 autocast' if bf16 else 'fp32'} | {t['forward']:.2f} | "
                  f"{t['backward']:.2f} | {t['optimizer']:.2f} | {sum(t.values()):.2f} |")


if __name__ == "__main__":
    main()
