"""Small Llama models that differ only in RoPE base, and their next-token training.

``rope_model_config`` builds a ``LlamaConfig`` whose only RoPE-specific field is the base,
``build_model`` seeds the weights (identical across bases), ``train_lm`` trains on
``shortlab.rope_experiment.retrieval_data.training_batches`` with extra weight on the answers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


def rope_model_config(base: float, vocab_size: int, *, context: int, hidden_size: int = 128,
                      num_layers: int = 2, head_dim: int = 32, intermediate_size: int | None = None):
    """A small ``LlamaConfig`` (standard transformers RoPE, rotate_half layout) whose only
    RoPE-specific field is the base: models built for different bases differ in nothing else.
    hidden_size / head_dim heads (no grouped KV), tied embeddings, no dropout."""
    from transformers import LlamaConfig

    if hidden_size % head_dim:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of head_dim {head_dim}")
    heads = hidden_size // head_dim
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
        intermediate_size=intermediate_size or 4 * hidden_size, max_position_embeddings=context,
        rope_parameters={"rope_type": "default", "rope_theta": float(base)},
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation="sdpa",
    )


def build_model(config, seed: int):
    """``LlamaForCausalLM(config)`` with weights drawn from ``seed`` (RoPE has no weights, so
    configs differing only in base give identical initial weights), in train mode."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.train()


def lm_losses(model, input_ids: torch.Tensor, answer_mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token cross-entropy over every predicted token, mean over the answer tokens
    only — where answer_mask [N, T] is True; NaN when there are none). Both inputs are moved to
    the device of the model's input embeddings."""
    device = model.get_input_embeddings().weight.device
    input_ids, answer_mask = input_ids.to(device), answer_mask.to(device)
    logits = model(input_ids=input_ids).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(),
                                               reduction="none").view(input_ids.shape[0], -1)
    return losses.mean(), losses[answer_mask[:, 1:]].mean()


def train_lm(model, batches: Iterator[dict[str, torch.Tensor]], steps: int, *,
             task_weight: float = 0.0, lr: float = 3e-3, warmup: int = 50,
             weight_decay: float = 0.01, clip: float = 1.0, seed: int = 0
             ) -> dict[str, list[float]]:
    """Next-token training on ``training_batches``: AdamW, linear warm-up then cosine decay to
    lr/10, gradient clipping. Minimises (mean loss over all tokens) + task_weight × (mean loss
    over the answer tokens): the answers are ~1 % of the tokens, and without the extra weight
    their gradient is drowned by the text's. Returns both losses ("loss", "answer_loss") of
    every step; leaves the model in eval mode."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if task_weight < 0:
        raise ValueError(f"task_weight must be >= 0, got {task_weight}")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                  betas=(0.9, 0.95))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    history: dict[str, list[float]] = {"loss": [], "answer_loss": []}
    for _ in range(steps):
        batch = next(batches)
        loss, answer_loss = lm_losses(model, batch["input_ids"], batch["answer_mask"])
        objective = loss + task_weight * answer_loss if task_weight else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        history["loss"].append(loss.item())
        history["answer_loss"].append(answer_loss.item())
    model.eval()
    return history
