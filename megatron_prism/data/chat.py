"""Qwen3-VL's chat layout, rendered by us (no Jinja), and PRISM's response format.

A conversation renders as Qwen's ChatML::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\\n
    <|im_start|>assistant\\n{response}<|im_end|>\\n

Each image is one ``<|image_pad|>`` here; the processor expands it to ``t*h*w / merge^2`` pads once
the image's grid is known. ``<image>`` markers in the record's text say where the images go; text
without markers gets its images first, as Qwen-VL's chat template places them.

The same special tokens name the same things in the Qwen tokenizer of a real checkpoint and in
the small tokenizer the embedded task trains for itself, so one code path serves both. The rendering
equals ``tokenizer.apply_chat_template`` with a Qwen-VL chat template (:data:`CHAT_TEMPLATE`, which
the embedded task's tokenizer ships) on :func:`template_messages` of the record; tests/data checks
it on multi-turn and image prompts.
"""

from __future__ import annotations

from megatron_prism.data.records import IMAGE_MARKER, Record, RecordError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

#: PRISM's response layout: the caption is the perception part, think + answer the reasoning part.
RESPONSE_TAGS = ("caption", "think", "answer")

#: The instruction PRISM's data puts in the system turn (our wording of the same format request).
PRISM_SYSTEM_PROMPT = (
    "You are a helpful assistant that answers questions about images.\n"
    "Reply in exactly this format:\n"
    "<caption>what in the image matters for the question</caption>"
    "<think>step-by-step reasoning</think>"
    "<answer>the final answer only</answer>"
)

IMAGE_BLOCK = f"{VISION_START}{IMAGE_PAD}{VISION_END}"

#: A Qwen-VL chat template (Jinja, as ``tokenizer_config.json`` carries it): ChatML turns, image
#: and video content parts as vision blocks, ``<|im_start|>assistant\n`` as the generation prompt.
#: Written for the embedded task's tokenizer, so that its model directory is as complete as a
#: released checkpoint's; tool calls are not part of PRISM's data and are left out.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'video' or 'video' in part %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _with_images(text: str, num_images: int, where: str) -> tuple[str, int]:
    """Replaces ``<image>`` markers by image blocks; returns (text, images used)."""
    markers = text.count(IMAGE_MARKER)
    if markers:
        return text.replace(IMAGE_MARKER, IMAGE_BLOCK), markers
    return IMAGE_BLOCK * num_images + text, num_images


def render_prompt(record: Record, system_prompt: str | None = PRISM_SYSTEM_PROMPT) -> str:
    """The chat text up to and including ``<|im_start|>assistant\\n`` (the generation prompt)."""
    where = record.origin or record.id
    turns = list(record.messages) if record.messages is not None else [{"role": "user", "content": record.prompt or ""}]
    if turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]  # a trailing assistant turn is the demonstration, not the prompt
    if system_prompt is not None and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": system_prompt})
    remaining = len(record.images)
    any_marker = any(IMAGE_MARKER in t["content"] for t in turns)
    parts = []
    first_user = True
    for turn in turns:
        content = turn["content"]
        if turn["role"] == "user" and (any_marker or first_user):
            content, used = _with_images(content, remaining if first_user and not any_marker else 0, where)
            remaining -= used
            first_user = False
        parts.append(f"{IM_START}{turn['role']}\n{content}{IM_END}\n")
    if remaining != 0:
        raise RecordError(f"{where}: {len(record.images)} images but the text places {len(record.images) - remaining}")
    return "".join(parts) + f"{IM_START}assistant\n"


def template_messages(record: Record, system_prompt: str | None = PRISM_SYSTEM_PROMPT,
                      *, with_response: bool = False) -> list[dict]:
    """The record as the ``messages`` of ``apply_chat_template`` (images as ``{"type": "image"}``
    parts where :func:`render_prompt` puts them), optionally with the demonstration as the last
    assistant turn."""
    turns = list(record.messages) if record.messages is not None else [{"role": "user", "content": record.prompt or ""}]
    if turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if system_prompt is not None and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": system_prompt})
    any_marker = any(IMAGE_MARKER in t["content"] for t in turns)
    out, first_user = [], True
    for turn in turns:
        content: str | list[dict] = turn["content"]
        if turn["role"] == "user" and (any_marker or (first_user and record.images)):
            pieces = turn["content"].split(IMAGE_MARKER)
            parts: list[dict] = [] if any_marker else [{"type": "image"} for _ in record.images]
            for i, text in enumerate(pieces):
                if i:
                    parts.append({"type": "image"})
                if text:
                    parts.append({"type": "text", "text": text})
            content = parts
        if turn["role"] == "user":
            first_user = False
        out.append({"role": turn["role"], "content": content})
    if with_response:
        out.append({"role": "assistant", "content": demonstration(record)})
    return out


def demonstration(record: Record) -> str:
    """The assistant text to learn from: ``response``, or the trailing assistant turn."""
    if record.response is not None:
        return record.response
    if record.messages and record.messages[-1]["role"] == "assistant":
        return record.messages[-1]["content"]
    raise RecordError(f"{record.origin or record.id}: no response to learn from")


def render_response(text: str) -> str:
    """The assistant text as the model must produce it, with its end-of-turn token."""
    return f"{text}{IM_END}"


def format_response(caption: str, think: str, answer: str) -> str:
    """A response in PRISM's ``<caption><think><answer>`` layout."""
    return f"<caption>{caption}</caption><think>{think}</think><answer>{answer}</answer>"
