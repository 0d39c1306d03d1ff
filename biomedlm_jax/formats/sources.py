"""Where weights come from: the one parser of `hf:DIR` and `orbax:WORKDIR` (and `peft:DIR` for convert).

Every flag that names a checkpoint (`init_from`, `convert --from/--to`, `evaluate_* --model`, the
lm-eval backend's `init_from`, a LoRA run's base reference) goes through `parse`, so they accept and
reject the same spellings with the same message.
"""
from __future__ import annotations

import dataclasses

KINDS = ("hf", "orbax")


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "hf" (a transformers GPT-2 directory), "orbax" (a biomedlm_jax workdir), "peft"
    path: str  # a local folder or an object-store URL

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def parse(spec: str, flag: str = "init_from", kinds: tuple = KINDS) -> Source:
    """"hf:DIR" / "orbax:WORKDIR" -> Source. ValueError naming `flag` for anything else."""
    kind, sep, path = str(spec).partition(":")
    if not sep or kind not in kinds or not path:
        raise ValueError(f"{flag}={spec!r}: expected {' or '.join(k + ':' + _PLACEHOLDER[k] for k in kinds)}")
    return Source(kind, path)


def parse_optional(spec: str, flag: str = "init_from", kinds: tuple = KINDS):
    """`parse`, or None for an empty spec (a run from random init)."""
    return parse(spec, flag, kinds) if spec else None


_PLACEHOLDER = {"hf": "DIR", "orbax": "WORKDIR", "peft": "DIR", "gguf": "FILE"}
