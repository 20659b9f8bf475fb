"""The record layouts other tools write, mapped onto ours: pure functions from one decoded row to a
record dict (the fields of :data:`megatron_prism.data.records.KNOWN_FIELDS`), no file I/O.

* **chat content**: a message's ``content`` may be text or a list of parts, as the OpenAI chat API
  and the Hugging Face processors write it: ``{"type": "text", "text"}``, ``{"type": "image"}``
  (optionally with ``"image"``/``"path"``/``"url"``), ``{"type": "image_url", "image_url":
  {"url"}}`` and the Responses API's ``input_text``/``input_image``. Each image part becomes an
  ``<image>`` marker; a part that carries its image (a path, a ``file://`` or ``data:`` URL) adds it
  to the record's images in order. Remote ``http(s)`` images are not fetched: that is an error.
* **verl** RL rows (``verl/examples/data_preprocess/*.py``): ``prompt`` (chat messages),
  ``images`` (``{"bytes", "path"}``), ``reward_model.ground_truth``, ``data_source``, ``ability``,
  ``extra_info``; PRISM's alignment rows add ``teacher_response`` (and ``teacher_caption`` /
  ``teacher_cot``). Read directly from Parquet by the loader, and by ``prism import verl``.
* **ShareGPT** (LLaMA-Factory's ``sharegpt`` format): ``conversations`` with ``from``/``value``
  (human, gpt, system) or ``messages`` with ``role``/``content``, optional ``system`` and ``images``.
* **Alpaca** (LLaMA-Factory's ``alpaca`` format): ``instruction``, ``input``, ``output``, optional
  ``system``, ``history`` (``[[question, answer], ...]``) and ``images``.

System turns are dropped into ``meta["system_prompt"]`` unless ``keep_system``: our chat renderer
adds PRISM's system prompt to every prompt without one, so one setting decides every stage's system
turn. A missing ``id`` is derived from the content (:func:`content_id`), so it is stable across
runs and identical rows get identical ids.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from megatron_prism.data.errors import RecordError

IMAGE_MARKER = "<image>"
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VERL_FIELDS = frozenset({"data_source", "ability", "reward_model", "extra_info", "teacher_response", "teacher_caption",
                         "teacher_cot"})
ALPACA_FIELDS = frozenset({"instruction", "input", "output", "history"})
SHAREGPT_FIELDS = frozenset({"conversations"})


def content_id(obj: Any) -> str:
    """A stable id from a row's content (canonical JSON; bytes hashed as they are)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray)):
            return {"sha1": hashlib.sha1(bytes(value)).hexdigest()}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    text = json.dumps(plain(obj), sort_keys=True, ensure_ascii=False, default=str)
    return "auto-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _image_from_url(url: str, where: str) -> Any:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise RecordError(f"{where}: a data: image URL must be base64-encoded")
        return {"base64": payload}
    if url.startswith(("http://", "https://")):
        raise RecordError(f"{where}: image {url[:80]} is a remote URL; download the images and give local paths "
                          "(megatron_prism never fetches at run time)")
    return url[len("file://"):] if url.startswith("file://") else url


def _part_image(part: dict[str, Any], where: str) -> Any:
    """The image a content part carries (path, ``{"base64"}`` or bytes), or None for a bare marker."""
    kind = part.get("type")
    if kind in ("image_url", "input_image"):
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url:
            raise RecordError(f"{where}: an {kind} content part needs image_url.url")
        return _image_from_url(url, where)
    for key in ("image", "path", "url"):
        value = part.get(key)
        if isinstance(value, str) and value:
            return _image_from_url(value, where)
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            return value
    return None


def content_text(content: Any, where: str, images: list[Any] | None = None) -> str:
    """A message content as text with ``<image>`` markers; images carried by parts are appended to
    ``images`` (when given; else a part carrying an image is an error)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordError(f"{where}: message content must be text or a list of content parts, got "
                          f"{type(content).__name__}")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            out.append(str(part.get("text") or ""))
        elif kind in ("image", "image_url", "input_image"):
            out.append(IMAGE_MARKER)
            ref = _part_image(part, where)
            if ref is not None:
                if images is None:
                    raise RecordError(f"{where}: an image inside a message part is not supported here; list it "
                                      "under 'images'")
                images.append(ref)
        else:
            raise RecordError(f"{where}: unknown message content part {part!r:.80} (text, image, image_url)")
    return "".join(out)


def chat_turns(messages: Any, where: str, *, images: list[Any] | None = None, role_key: str = "role",
               text_key: str = "content", roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    """``[{"role", "content": str}]`` from chat messages in any of the layouts above."""
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: the conversation must be a non-empty list of turns")
    roles = roles or {r: r for r in ROLES}
    turns = []
    for turn in messages:
        role = roles.get(turn.get(role_key)) if isinstance(turn, dict) else None
        if role is None:
            raise RecordError(f"{where}: unsupported turn {turn!r:.80} (roles: {', '.join(sorted(roles))})")
        turns.append({"role": role, "content": content_text(turn.get(text_key), where, images)})
    return turns


def prompt_fields(turns: list[dict[str, str]], *, keep_system: bool, where: str) -> dict[str, Any]:
    """``prompt`` (one user turn) or ``messages``, and ``response`` from a trailing assistant turn;
    system turns into ``meta["system_prompt"]`` unless ``keep_system``."""
    out: dict[str, Any] = {"meta": {}}
    turns = list(turns)
    if turns and turns[-1]["role"] == "assistant":
        out["response"] = turns.pop()["content"]
    system = [t["content"] for t in turns if t["role"] == "system"]
    if system and not keep_system:
        out["meta"]["system_prompt"] = "\n".join(system)
        turns = [t for t in turns if t["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise RecordError(f"{where}: the prompt turns must end with a user turn")
    if len(turns) == 1:
        out["prompt"] = turns[0]["content"]
    else:
        out["messages"] = turns
    return out


def _row_images(value: Any, where: str, image_root: Path | None) -> list[Any]:
    items = [value] if isinstance(value, str) else list(value or [])
    out = []
    for item in items:
        if isinstance(item, dict) and item.get("bytes"):
            out.append({"bytes": bytes(item["bytes"])})
        elif isinstance(item, dict) and item.get("path"):
            out.append(_rooted(str(item["path"]), image_root))
        elif isinstance(item, str) and item:
            out.append(_rooted(item, image_root))
        elif isinstance(item, (bytes, bytearray)):
            out.append(bytes(item))
        else:
            raise RecordError(f"{where}: an image must be a path or {{'bytes': ...}}, got {type(item).__name__}")
    return out


def _rooted(path: str, image_root: Path | None) -> str:
    """An image path made absolute against ``image_root`` (so no reader joins a folder twice)."""
    p = Path(path)
    if p.is_absolute() or image_root is None:
        return path
    return str((image_root / p).absolute())


def verl_record(row: dict[str, Any], where: str, *, keep_system: bool = False,
                image_root: Path | None = None) -> dict[str, Any]:
    """A verl RL / PRISM alignment row as a record dict."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):  # some verl sets store the prompt as JSON text
        try:
            prompt = json.loads(prompt)
        except json.JSONDecodeError:
            raise RecordError(f"{where}: 'prompt' is text but not a JSON message list") from None
    if not isinstance(prompt, list) or not prompt:
        raise RecordError(f"{where}: 'prompt' must be a non-empty list of chat messages")
    images = _row_images(row.get("images"), where, image_root)
    part_images: list[Any] = []
    obj = prompt_fields(chat_turns(prompt, where, images=part_images), keep_system=keep_system, where=where)
    obj.pop("response", None)  # a trailing assistant turn in a verl prompt is a prefill, not a demonstration
    reward_model = row.get("reward_model") or {}
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if isinstance(truth, (list, tuple)):
        obj["meta"]["ground_truths"] = [str(t) for t in truth]
        truth = truth[0] if truth else None
    if truth is not None and str(truth).strip():
        obj["answer"] = str(truth)
    if row.get("teacher_response"):
        obj["response"] = str(row["teacher_response"])
    obj["images"] = images + part_images
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    source = row.get("data_source")
    index = extra.get("index", extra.get("id"))
    if source and index is not None:
        obj["id"] = f"{source}-{index}"
    elif row.get("id") is not None:
        obj["id"] = str(row["id"])
    if source:
        obj["source"] = str(source)
    obj["meta"].update({k: row[k] for k in ("ability", "teacher_caption", "teacher_cot") if row.get(k) is not None})
    if isinstance(reward_model, dict) and reward_model.get("style"):
        obj["meta"]["reward_style"] = reward_model["style"]
    if extra:
        obj["meta"]["extra_info"] = extra
    return obj


def sharegpt_record(row: Any, where: str, *, keep_system: bool = False,
                    image_root: Path | None = None) -> dict[str, Any]:
    """A ShareGPT / LLaMA-Factory ``sharegpt`` conversation as a record dict."""
    if not isinstance(row, dict):
        raise RecordError(f"{where}: a conversation must be a JSON object, got {type(row).__name__}")
    part_images: list[Any] = []
    if "messages" in row:
        turns = chat_turns(row["messages"], where, images=part_images, roles=SHAREGPT_ROLES)
    elif "conversations" in row:
        turns = chat_turns(row["conversations"], where, images=part_images, role_key="from", text_key="value",
                           roles=SHAREGPT_ROLES)
    else:
        raise RecordError(f"{where}: no 'messages' or 'conversations' (has {sorted(row)})")
    if row.get("system"):
        turns.insert(0, {"role": "system", "content": str(row["system"])})
    obj = prompt_fields(turns, keep_system=keep_system, where=where)
    obj["images"] = _row_images(row.get("images"), where, image_root) + part_images
    return _common_fields(row, obj)


def alpaca_record(row: Any, where: str, *, keep_system: bool = False,
                  image_root: Path | None = None) -> dict[str, Any]:
    """A LLaMA-Factory ``alpaca`` row (instruction, input, output, history, system) as a record dict."""
    if not isinstance(row, dict):
        raise RecordError(f"{where}: an alpaca row must be a JSON object, got {type(row).__name__}")
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise RecordError(f"{where}: an alpaca row needs a non-empty 'instruction' (has {sorted(row)})")
    turns = [{"role": "system", "content": str(row["system"])}] if row.get("system") else []
    for pair in row.get("history") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RecordError(f"{where}: 'history' must be a list of [question, answer] pairs")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    extra = row.get("input")
    turns.append({"role": "user", "content": instruction + (f"\n{extra}" if isinstance(extra, str) and extra else "")})
    if isinstance(row.get("output"), str) and row["output"]:
        turns.append({"role": "assistant", "content": row["output"]})
    obj = prompt_fields(turns, keep_system=keep_system, where=where)
    obj["images"] = _row_images(row.get("images"), where, image_root)
    return _common_fields(row, obj)


def _common_fields(row: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    for key in ("answer", "ground_truth"):
        if row.get(key) is not None and "answer" not in obj:
            obj["answer"] = str(row[key])
    if row.get("id") is not None:
        obj["id"] = str(row["id"])
    if row.get("source") is not None:
        obj["source"] = str(row["source"])
    return obj


def importer_for(fields: set[str]) -> str | None:
    """The ``prism import`` layout a row with these fields is written in, if it looks like one."""
    if fields & SHAREGPT_FIELDS:
        return "sharegpt"
    if "instruction" in fields and fields & {"output", "input"}:
        return "llamafactory"
    if fields & (VERL_FIELDS - {"teacher_response"}) or "reward_model" in fields:
        return "verl"
    return None


def decode_base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise RecordError(f"{where}: an image's base64 data is not valid base64") from None
