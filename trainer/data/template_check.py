"""The start-up chat-template check: show one rendered sample with its trained tokens, fail on a bad mask.

Catches the failures that otherwise only show at inference: the assistant's stop token left out
of the loss (the model never learns to stop), a template whose rendering of the history changes as
the conversation grows (the mask lands on the wrong tokens), a generation prompt that tokenizes
differently from the same text inside the full conversation (training sees tokens inference never
produces), and supervised empty think blocks.
"""
from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from trainer.data.formats import IGNORE, TemplateError, chat_spans, labels_from_spans, render, validate_chat

TRAINED_STYLE = "bold black on green"
EMPTY_THINK = ("<think>\n\n</think>", "<think></think>")


def check_chat_template(tokenizer, messages, stop_token: str | None = None, console: Console | None = None) -> list[int]:
    """Check ``messages`` renders to a trustworthy mask; print it when ``console`` is given. Returns the labels."""
    stop_token = stop_token or tokenizer.eos_token
    messages, trained = validate_chat(messages)
    full, spans = chat_spans(tokenizer, messages, trained, stop_token, strict=True)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = labels_from_spans(ids, offsets, spans)

    for j, (start, end) in zip(trained, spans):
        if not any(labels[t] != IGNORE and offsets[t][1] == end for t in range(len(ids))):
            raise TemplateError(
                f"chat template check: the stop token {stop_token!r} of message {j} is not a whole trained token "
                f"(it is merged with neighbouring text by the tokenizer); fix the template or data.stop_token"
            )
        if any(think in full[start:end] for think in EMPTY_THINK):
            raise TemplateError(f"chat template check: message {j} trains on an empty think block {full[start:end]!r:.80}; "
                                f"render assistant turns without it or set data.template_check=false")
        prompt_ids = tokenizer(render(tokenizer, messages[:j], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise TemplateError(
                f"chat template check: the generation prompt before message {j} tokenizes differently on its own than "
                f"inside the conversation, so training would condition on tokens inference never sees; fix the template"
            )
    if console is not None:
        console.print(_sample_panel(tokenizer, ids, labels))
    return labels


def _sample_panel(tokenizer, ids: list[int], labels: list[int]) -> Panel:
    text = Text()
    for token_id, label in zip(ids, labels):
        text.append(tokenizer.decode([token_id]), style=TRAINED_STYLE if label != IGNORE else "dim")
    trained = sum(label != IGNORE for label in labels)
    title = f"chat template check: trained tokens highlighted ({trained} of {len(ids)})"
    return Panel(text, title=title, subtitle="data.template_check=false skips this", expand=False)
