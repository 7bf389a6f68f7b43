"""Fine-tuning's data and schedule, pure: examples -> token ids with targets -> batches.

What ``cluster.finetune(data, ...)`` takes as ``data``:
- a list of chats (each a list of ``{"role", "content"}`` messages, or ``{"messages": [...]}``):
  the loss is on the assistant turns only (their content and end-of-turn tokens), rendered with
  the model's own chat template;
- ``{"prompt": ..., "completion": ...}`` rows: the loss on the completion (and an end token);
- ``{"text": ...}`` rows: the loss on every token;
- a pandas DataFrame with those columns, or the path of a JSONL file of those rows.

The schedule is a pure function of (the examples, the settings, the step): step ``k`` takes
batch ``k mod batches_per_epoch`` of epoch ``k // batches_per_epoch``, whose order is a
permutation drawn from (seed, epoch). A job resumed at step k therefore sees exactly the data an
uninterrupted run sees from step k.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

IGNORE = -100
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Example:
    """One training sequence: its token ids and, per position, the token it must predict
    (IGNORE where no loss is taken)."""

    ids: tuple[int, ...]
    targets: tuple[int, ...]

    @property
    def target_count(self) -> int:
        return sum(t != IGNORE for t in self.targets)


def rows_of(data) -> list:
    """``data`` as a list of rows (a JSONL path is read, a DataFrame becomes its records)."""
    if isinstance(data, (str, Path)):
        path = Path(data).expanduser()
        if not path.is_file():
            raise ModelError(f"training data {path} is not a file; pass a JSONL path, a list of chats or a DataFrame")
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ModelError(f"{path} line {number} is not JSON: {exc}") from None
        return rows
    if hasattr(data, "to_dict") and hasattr(data, "columns"):       # a pandas DataFrame
        return data.to_dict("records")
    if isinstance(data, (list, tuple)):
        return list(data)
    raise ModelError(f"training data must be a list of chats or rows, a DataFrame or a JSONL path; got "
                     f"{type(data).__name__}")


def tokenize(rows: list, tokenizer, max_length: int) -> tuple[list[Example], int]:
    """(examples, rows skipped: nothing to learn left after truncation to ``max_length``).
    Raises ModelError naming the first row that is not a chat, prompt/completion or text."""
    examples, skipped = [], 0
    for index, row in enumerate(rows):
        ids, trainable = _encode(row, tokenizer, index)
        ids, trainable = ids[:max_length], trainable[:max_length]
        targets = tuple(ids[t + 1] if trainable[t + 1] else IGNORE for t in range(len(ids) - 1)) + (IGNORE,)
        example = Example(tuple(ids), targets)
        if example.target_count == 0:
            skipped += 1
            continue
        examples.append(example)
    if not examples:
        raise ModelError(f"none of the {len(rows)} training rows has a token to learn within max_length="
                         f"{max_length} (chats need an assistant turn, rows a completion or text)")
    return examples, skipped


def _encode(row, tokenizer, index: int) -> tuple[list[int], list[bool]]:
    if isinstance(row, dict) and "messages" in row:
        row = row["messages"]
    if isinstance(row, (list, tuple)):
        return _encode_chat(list(row), tokenizer, index)
    if isinstance(row, dict) and "prompt" in row and "completion" in row:
        prompt = tokenizer(str(row["prompt"]), add_special_tokens=True)["input_ids"]
        completion = tokenizer(str(row["completion"]), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id]
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    if isinstance(row, dict) and "text" in row:
        ids = tokenizer(str(row["text"]), add_special_tokens=True)["input_ids"]
        return ids, [True] * len(ids)
    raise ModelError(f"training row {index} is not a chat (a list of messages, or {{'messages': [...]}}), a "
                     f"{{'prompt', 'completion'}} row or a {{'text'}} row: {str(row)[:120]}")


def _encode_chat(messages: list, tokenizer, index: int) -> tuple[list[int], list[bool]]:
    """The chat's ids as the chat template renders them; trainable on each assistant turn (what
    the template adds for it after the generation prompt, end of turn included)."""
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") \
                or not isinstance(m.get("content"), str):
            raise ModelError(f"training chat {index}: every message needs a role (system, user, assistant, tool) "
                             f"and string content; got {str(m)[:120]}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ModelError(f"training chat {index} has no assistant message to learn")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError("this model's tokenizer has no chat template: give prompt/completion or text rows")
    ids = _render(tokenizer, messages, False)
    trainable = [False] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:turn], True)
        through = _render(tokenizer, messages[:turn + 1], False)
        if ids[:len(through)] != through or through[:len(before)] != before:
            raise ModelError("this model's chat template does not render a chat's turns as prefixes of the whole "
                             "chat, so assistant tokens cannot be told apart: give prompt/completion rows")
        for t in range(len(before), len(through)):
            trainable[t] = True
    return ids, trainable


def _render(tokenizer, messages: list, generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


# ----------------------------------------------------------------------------- schedule

def batches_per_epoch(count: int, batch_size: int) -> int:
    return math.ceil(count / batch_size)


def batch_at(examples: list[Example], step: int, batch_size: int, seed: int) -> list[Example]:
    """The examples of optimizer step ``step`` (see the module docstring)."""
    import torch

    per_epoch = batches_per_epoch(len(examples), batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [examples[i] for i in order[index * batch_size:(index + 1) * batch_size].tolist()]


def micro_batches(batch: list[Example], micro_batch_size: int, pad_id: int) -> list[tuple]:
    """[(ids (b, T) int64, targets (b, T) int32)] of the batch, each right-padded to its longest."""
    import torch

    out = []
    for start in range(0, len(batch), micro_batch_size):
        part = batch[start:start + micro_batch_size]
        width = max(len(e.ids) for e in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.int64)
        targets = torch.full((len(part), width), IGNORE, dtype=torch.int32)
        for row, example in enumerate(part):
            ids[row, :len(example.ids)] = torch.tensor(example.ids)
            targets[row, :len(example.targets)] = torch.tensor(example.targets, dtype=torch.int32)
        out.append((ids, targets))
    return out


def learning_rate(step: int, total: int, base: float, schedule: str = "linear", warmup: int = 0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``: linear warm-up over
    ``warmup`` steps, then constant, linear to 0 or cosine to 0 (transformers' schedules)."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup       # 0-based steps: the first step is not wasted at lr 0
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * max(0.0, 1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))
