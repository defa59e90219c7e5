"""The message lists a session sends, built explicitly (the reference mutated one shared list).

`reference` mode reproduces the reference sequence: one shared list per session; each call
appends its (optional) system prompt and its user prompt, and the reply comes back as a `system`
message "Patient: ..." / "Doctor: ...". So the list accumulates every persona prompt, every
instruction and every reply.

`roles` mode is the cleaner option: a call sees its own system prompt, then the dialogue from its
speaker's point of view (own lines as `assistant`, the other side's as `user`; the doctor also sees
its own earlier question/answer notes), then this call's prompt as the last `user` message.
"""
from __future__ import annotations

from dataclasses import dataclass, field

HISTORY_MODES = ("reference", "roles")
LABEL = {"patient": "Patient", "doctor": "Doctor"}


@dataclass
class Turn:
    speaker: str      # "patient" or "doctor"
    prompt: str | None  # the instruction of the call (roles mode: None for a plain dialogue line)
    system: str | None
    reply: str
    public: bool      # a line of the dialogue (True) or a doctor's private note (False)


@dataclass
class Conversation:
    mode: str = "reference"
    opening: str = "Hi."  # roles mode: the therapist's first line when the patient speaks first
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self):
        if self.mode not in HISTORY_MODES:
            raise ValueError(f"history mode must be one of {HISTORY_MODES}, not {self.mode!r}")

    def request(self, speaker: str, prompt: str | None, system: str | None = None) -> list[dict]:
        """The messages for the next call of `speaker` in the shared conversation."""
        if self.mode == "reference":
            return [m for t in self.turns for m in _reference_messages(t)] + fresh(prompt, system)
        messages = ([{"role": "system", "content": system}] if system else []) + self._view(speaker)
        if prompt is not None:
            _append(messages, "user", prompt)
        elif messages[-1]["role"] != "user":  # answer the other side's last line, or open
            _append(messages, "user", self.opening)
        return messages

    def add(self, speaker: str, prompt: str, system: str | None, reply: str, public: bool) -> None:
        self.turns.append(Turn(speaker, prompt, system, reply, public))

    def _view(self, speaker: str) -> list[dict]:
        messages: list[dict] = []
        for t in self.turns:
            if t.public:
                role = "assistant" if t.speaker == speaker else "user"
                _append(messages, role, t.reply)
            elif t.speaker == speaker:
                _append(messages, "user", t.prompt)
                _append(messages, "assistant", t.reply)
        if messages and messages[0]["role"] == "assistant":  # the patient opened: after the greeting
            messages.insert(0, {"role": "user", "content": self.opening})
        return messages


def fresh(prompt: str, system: str | None = None) -> list[dict]:
    """A call outside the shared conversation: optional system prompt, then the user prompt."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def _reference_messages(t: Turn) -> list[dict]:
    return fresh(t.prompt, t.system) + [{"role": "system", "content": f"{LABEL[t.speaker]}: {t.reply}"}]


def _append(messages: list[dict], role: str, content: str) -> None:
    """Adjacent messages of one role are joined, so roles alternate for strict chat templates."""
    if messages and messages[-1]["role"] == role:
        messages[-1] = {"role": role, "content": messages[-1]["content"] + "\n\n" + content}
    else:
        messages.append({"role": role, "content": content})
