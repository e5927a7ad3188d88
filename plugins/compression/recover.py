"""Short recovery fine-tuning after a lossy step (low-rank, pruning), distilled from the
parent: the loss is half cross-entropy on the labels and half the KL divergence from the
parent's predictions at temperature ``TEMPERATURE`` (soft targets carry more than the
labels of the few rows the parent was trained on)."""

from __future__ import annotations

import numpy as np
import torch

from .candidate import Candidate, StepContext

#: Rows per recovery step.
RECOVER_BATCH = 16
TEMPERATURE = 2.0


def fine_tune(candidate: Candidate, context: StepContext, steps: int, learning_rate: float) -> float:
    """Fine-tune the candidate's model for ``steps`` batches of the training split (AdamW,
    clipped gradients), distilled from ``context.teacher`` when there is one; the last
    smoothed loss. Pruning masks, if still attached, keep pruned weights at zero throughout."""
    model = candidate.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    order = np.random.RandomState(context.seed).permutation(len(context.train_texts))
    smoothed = float("nan")
    for step in range(steps):
        picked = order[(step * RECOVER_BATCH) % len(order):][:RECOVER_BATCH]
        batch = candidate.tokenizer([context.train_texts[i] for i in picked], padding="longest",
                                    truncation=True, max_length=context.max_tokens,
                                    return_tensors="pt")
        labels = torch.tensor([context.train_targets[i] for i in picked])
        logits = model(**batch).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        if context.teacher is not None:
            with torch.no_grad():
                target = context.teacher(**batch).logits
            loss = 0.5 * loss + 0.5 * TEMPERATURE ** 2 * torch.nn.functional.kl_div(
                torch.log_softmax(logits / TEMPERATURE, -1),
                torch.log_softmax(target / TEMPERATURE, -1),
                reduction="batchmean", log_target=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        smoothed = value if np.isnan(smoothed) else 0.9 * smoothed + 0.1 * value
    model.eval()
    return round(smoothed, 4)
