"""Chat messages -> token ids through the model's own chat template."""
from __future__ import annotations

from ..errors import RequestError

ROLES = ("system", "user", "assistant")
# OpenAI's newer name for the system role; chat templates know only "system".
ROLE_ALIASES = {"developer": "system"}


def message_text(content, index: int) -> str:
    """A message's text: a string, or OpenAI text parts [{"type": "text", "text": ...}]."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{index}].content: only text parts "
                                   "({\"type\": \"text\", \"text\": ...}) are supported",
                                   param=f"messages[{index}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts",
                       param=f"messages[{index}].content")


def normalize_messages(messages) -> list[dict]:
    """Validate chat messages; returns [{"role", "content": str}] or raises RequestError."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object with role and content",
                               param=f"messages[{index}]")
        role = message.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise RequestError(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}",
                               param=f"messages[{index}].role")
        out.append({"role": role, "content": message_text(message.get("content"), index)})
    return out


def apply_chat_template(tokenizer, messages) -> list[int]:
    """Token ids of the conversation with the assistant's turn opened (add_generation_prompt)."""
    messages = normalize_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template; use the completions "
                           "endpoint (or Cluster.generate) with a plain prompt", param="messages")
    import jinja2

    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except jinja2.TemplateError as exc:  # e.g. a template that insists on alternating roles
        raise RequestError(f"the model's chat template rejected these messages: {exc}",
                           param="messages") from exc
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]
