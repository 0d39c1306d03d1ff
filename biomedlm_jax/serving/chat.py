"""POST /v1/chat/completions for runs that carry a prompt template (seq2seq fine-tunes).

A BioMedLM model has no chat template, but a seq2seq fine-tune knows how its questions were framed:
its checkpoint's meta holds the template ("template" layout: `prompt_template.format(question=...) +
answer_prefix`; BioMedLM's own layout: `question <|startoftext|>`). A chat request with a single user
turn becomes that prompt, and the answer comes back in the chat completion shape. Without a template
(a pretrained model, an HF export) the route answers 404 saying to use /v1/completions; `serve
--prompt_template` supplies one for any model.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.serving.http import ApiError


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How a question becomes the prompt the model was fine-tuned on."""

    layout: str = "template"  # "template" | "biomedlm"
    template: str = "{question}"
    answer_prefix: str = ""

    def apply(self, question: str) -> str:
        if self.layout == "biomedlm":
            return question + tokenizer_lib.BOS_TOKEN
        return self.template.format(question=question) + self.answer_prefix

    @classmethod
    def from_meta(cls, meta: dict) -> Optional["PromptTemplate"]:
        """The template of a checkpoint's meta: its "prompt_template" entry, or a seq2seq run's config."""
        given = meta.get("prompt_template")
        if given:
            return cls(**given)
        data = (meta.get("config") or {}).get("data") or {}
        if data.get("task") != "seq2seq":
            return None
        layout = data.get("layout") or ("biomedlm" if data.get("format") == "textgen" else "template")
        return cls(layout, data.get("prompt_template") or "{question}", data.get("answer_prefix") or "")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: Optional[str] = None


class ChatRequest(BaseModel):
    """OpenAI's chat request, the fields the completions route implements (others only at neutral values)."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(1.0, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(0, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-2**63, lt=2**63)
    stream: Optional[bool] = False
    stream_options: Optional[dict] = None
    n: Optional[int] = Field(1, ge=1, le=1)
    logprobs: Optional[Literal[False]] = False
    presence_penalty: Optional[float] = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: Optional[float] = Field(0.0, ge=0.0, le=0.0)
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=0)
    user: Optional[str] = None


def completion_fields(req: ChatRequest, template: PromptTemplate) -> dict:
    """The completions request a chat request stands for: one user turn through the template."""
    if len(req.messages) != 1 or req.messages[0].role != "user":
        raise ApiError(400, "'messages': this model answers one question at a time (it was fine-tuned on "
                       "single prompts): send exactly one message with role 'user'", "messages")
    fields = req.model_dump(exclude={"messages", "max_completion_tokens", "logprobs"}, exclude_none=True)
    if req.max_completion_tokens is not None:
        fields["max_tokens"] = req.max_completion_tokens
    fields.setdefault("max_tokens", None)
    return dict(fields, prompt=template.apply(req.messages[0].content))


def message(text: str) -> dict:
    return {"role": "assistant", "content": text}
