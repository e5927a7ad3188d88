"""Keyed dropout on a real (tiny, random) BERT: one global batch and two strided shards padded
to the global length give the same gradient; masks change with the step, row and call."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from llmos.drivers.dropout import DropoutKey, keyed_dropout

ROWS, LENGTH = 6, 12


@pytest.fixture
def model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, num_labels=3,
                        hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3,
                        attn_implementation="sdpa")
    return BertForSequenceClassification(config).train()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Rows of different lengths, padded to the longest (as the tokenizer pads a batch)."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([12, 5, 9, 3, 12, 7])
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 100, (ROWS, LENGTH), generator=generator) * mask
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.randint(0, 3, (ROWS,), generator=generator)}


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def global_gradient(model: BertForSequenceClassification, batch: dict[str, torch.Tensor],
                    step: int) -> dict[str, torch.Tensor]:
    """One process: the mean loss of the whole batch."""
    with keyed_dropout(model, DropoutKey(seed=7, step=step, rows=range(ROWS))):
        loss = model(**batch).loss
    loss.backward()
    return gradients(model)


def test_global_batch_gradient_equals_the_mean_of_two_strided_shards(model, batch):
    whole = global_gradient(model, batch, step=3)
    world, shard_grads = 2, []
    for rank in range(world):
        rows = list(range(rank, ROWS, world))  # DDP's shard: rows r, r + N, ...
        shard = {k: v[rows] for k, v in batch.items()}  # padded to the global longest row
        with keyed_dropout(model, DropoutKey(seed=7, step=3, rows=rows)):
            logits = model(input_ids=shard["input_ids"],
                           attention_mask=shard["attention_mask"]).logits
        loss = nn.functional.cross_entropy(logits, shard["labels"], reduction="sum")
        (loss * world / ROWS).backward()  # as DistributedSession weights a shard
        shard_grads.append(gradients(model))
    assert whole.keys() == shard_grads[0].keys() and len(whole) == len(
        list(model.parameters()))
    for name, grad in whole.items():
        mean = (shard_grads[0][name] + shard_grads[1][name]) / world  # DDP's all-reduce average
        torch.testing.assert_close(mean, grad, rtol=1e-5, atol=1e-7, msg=name)


def test_masks_change_with_the_step_and_are_applied(model, batch):
    rng = torch.get_rng_state()
    first, again, later = (global_gradient(model, batch, step) for step in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout drew from the global generator
    model.eval()
    model(**batch).loss.backward()
    plain = gradients(model)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(first[name], again[name])
    assert not torch.allclose(first[name], later[name], rtol=1e-3)
    assert not torch.allclose(first[name], plain[name], rtol=1e-3)


def test_a_rows_mask_depends_on_its_global_index_step_and_call_only():
    ones = torch.ones(4, 3, 50)
    whole = DropoutKey(seed=0, step=5, rows=range(4))
    masks = whole.drop(ones, 0.5)
    shard = DropoutKey(seed=0, step=5, rows=[1, 3]).drop(ones[:2], 0.5)
    assert torch.equal(shard, masks[[1, 3]])
    assert set(masks.unique().tolist()) == {0.0, 2.0}  # kept values scaled by 1 / (1 - p)
    assert not torch.equal(masks[0], masks[1])  # rows differ
    assert not torch.equal(whole.drop(ones, 0.5), masks)  # the next call differs
    assert not torch.equal(DropoutKey(seed=0, step=6, rows=range(4)).drop(ones, 0.5), masks)
    with pytest.raises(RuntimeError, match="batch must be the first dimension"):
        whole.drop(torch.ones(3, 2), 0.5)


def test_the_model_is_restored_after_the_block(model, batch):
    with keyed_dropout(model, DropoutKey(seed=0, step=0, rows=range(ROWS))) as key:
        model(**batch)
        with pytest.raises(RuntimeError, match="does not nest"), keyed_dropout(model, key):
            pass
    # embeddings, 3 per layer (attention probabilities, attention output, feed-forward), head
    assert key.calls == 1 + 3 * 2 + 1
    assert model.config._attn_implementation == "sdpa"
    assert all("forward" not in vars(m) for m in model.modules() if isinstance(m, nn.Dropout))
