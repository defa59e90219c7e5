"""MentalArena self-play: one base model plays patient and therapist; each session is one record.

    python arena_med.py                                   # embedded SmolLM2, bundled sample patients
    python arena_med.py --base_model gpt-3.5-turbo --output_file test.jsonl
    python arena_med.py --base_model meta-llama/Meta-Llama-3-8B --judge_model gpt-4-turbo-2024-04-09
    python arena_med.py --symptom_encoder off --output_file outputs/no_encoder.jsonl  # the paper's ablations
    python arena_med.py --symptom_decoder off --output_file outputs/no_decoder.jsonl

The session follows ../shared/docs/METHOD.md §4 step by step (numbers in the comments below).
Re-running the same command resumes: finished sessions are skipped.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mentalarena.engines.chat import Reply
from mentalarena.engines.routes import describe_routes, judge_route, require_credentials, route, runs_on
from mentalarena import cli
from mentalarena.cli import auto_dtype, checked
from mentalarena.store.keys import model_fingerprint, request_seed
from mentalarena.selfplay.data import DEFAULT_PATIENTS_FILE, DEFAULT_PRINCIPLES_FILE, load_patients, load_principles
from mentalarena.selfplay.dialogue import HISTORY_MODES, Conversation, fresh as fresh_messages
from mentalarena.engines.engine import Gate, ModelClient
from mentalarena.errors import InputError, ServiceRefused, check_choice
from mentalarena.flags import check_numbers
from mentalarena.store.jsonl import append_jsonl, read_jsonl, repair_torn_tail, write_json_atomic
from mentalarena.store.locks import OutputLock
from mentalarena.selfplay.parsing import (parse_extraction, parse_extraction_reference, parse_group_number,
                                 parse_score, parse_score_reference)
from mentalarena.progress import SessionProgress
from mentalarena.prompts import Prompts
from mentalarena.selfplay.similarity import BUNDLED_NAME, Encoder, threshold_for, top_k_groups

log = logging.getLogger("mentalarena.arena")
ILLNESS_PROMPTS = ("name", "reference")
FEEDBACK_MODES = ("steer", "reference")  # steer: decoder feedback reaches the doctor (paper's intent)
DECODER_ITEMS = ("intermediate_belief", "intermediate_belief_depression", "coping_strategies", "situation")
EMOTION_FORMATS = ("joined", "reference")  # --emotion_format (profile_slots)
SWITCHES = ("on", "off")  # --symptom_encoder / --symptom_decoder: the paper's ablations
PERSONA_TEMPLATES = ("patient_cbt", "patient_neutral")  # stored once per record, not at every turn
# Flags that change how a run goes, not the records it makes (iterate.py lets a re-run change them).
RUNNING_FLAGS = ("progress", "concurrency", "max_batch_size", "prefix_cache_gb", "device", "request_timeout",
                 "api_key_env", "judge_api_key_env")
# --score_parser: robust, the 1-10 health rating as a person reads it (off the scale: unscored);
# reference, the reference's int() else first integer (a "32" ends the search as a top score)
SCORE_PARSERS = {"robust": parse_score, "reference": parse_score_reference}


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a session's content; stored in every record."""
    base_model: str
    judge_model: str
    encoder: str
    similarity_threshold: float
    temperature: float = 0.8
    max_new_tokens: int = 256
    dialogue_rounds: int = 4
    num_principle_groups: int = 5
    max_decode_rounds: int = 5
    max_tries: int = 7
    target_score: int = 9
    feedback_mode: str = "steer"
    history_mode: str = "reference"
    merge_system: bool = False
    extraction_parser: str = "robust"
    illness_prompt: str = "name"
    seed: int = 0
    prompts_hash: str = ""
    # None: the checkpoint's generation config (local models) or the server's default (APIs)
    top_p: float | None = None
    top_k: int | None = None
    max_context_tokens: int | None = None
    # where each role runs: "embedded" / "hf" / "openai-api" / "served" (which replicas answer does not count)
    base_runs_on: str = "embedded"
    judge_runs_on: str = "embedded"
    dtype: str | None = None    # local weights' precision (None: no role runs locally)
    patients_hash: str = ""     # the content of the whole patients file (so a larger --limit extends a run)
    principles_hash: str = ""
    # the paper's ablations ("off": the component is left out of every session)
    symptom_encoder: str = "on"
    symptom_decoder: str = "on"
    score_parser: str = "robust"  # how the judge's health rating is read (SCORE_PARSERS)
    # the content of a local model folder (keys.model_fingerprint): retrained in place, it is another model
    base_fingerprint: str = ""
    judge_fingerprint: str = ""
    emotion_format: str = "joined"  # how a profile's list of emotions is written (EMOTION_FORMATS)

    def digest(self) -> str:
        values = asdict(self)
        # Added after records existed: at "on" they are left out of the hash, so an output made before
        # them still resumes; "off" changes the hash, so an ablation never resumes into a full run.
        for key in ("symptom_encoder", "symptom_decoder"):
            if values[key] == "on":
                del values[key]
        # Older records were scored by the first integer, which "reference" reproduces (bar "-2" and
        # "1_0"): left out of the hash there, so they resume under --score_parser reference; the
        # default "robust" is hashed, so an old output is never resumed under another rule.
        if values["score_parser"] == "reference":
            del values["score_parser"]
        for key in ("base_fingerprint", "judge_fingerprint"):  # none for hub ids, API models, the embedded one
            if not values[key]:
                del values[key]
        if values["emotion_format"] == "joined":  # the rendering of before the flag existed: hashes as it did
            del values["emotion_format"]
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


class Session:
    """One patient's self-play: the shared conversation, fresh calls, and the transcript."""

    def __init__(self, patient: dict, sample: int, ctx: "Arena"):
        self.patient, self.sample, self.ctx = patient, sample, ctx
        self.conv = Conversation(ctx.settings.history_mode, opening=ctx.prompts.render("roles_opening"))
        self.transcript: list[dict] = []

    def render(self, template: str, /, **values) -> str:
        return self.ctx.prompts.render(template, **values)

    async def shared(self, step: str, speaker: str, template: str, prompt: str | None,
                     system: str | None = None, public: bool = False) -> str:
        """A call inside the session's conversation (the reference's shared message list)."""
        reply = await self._call(step, speaker, "base", "shared", template,
                                 self.conv.request(speaker, prompt, system), prompt)
        self.conv.add(speaker, prompt, system, reply, public)
        return reply

    async def fresh(self, step: str, speaker: str, model: str, template: str, prompt: str,
                    system: str | None = None) -> str:
        """A call with a new, empty conversation."""
        return await self._call(step, speaker, model, "fresh", template, fresh_messages(prompt, system), prompt)

    async def _call(self, step, speaker, model, thread, template, messages, prompt) -> str:
        """Every model call of the session. Its seed comes from the run's seed and the call's
        identity (patient, sample, step), so a reply depends on nothing else: not on the concurrency,
        the batch it shared, or the server that answered it."""
        client = self.ctx.base if model == "base" else self.ctx.judge
        seed = request_seed(self.ctx.settings.seed, self.patient["id"], self.sample, step)
        entry = {"step": step, "speaker": speaker, "model": model, "thread": thread, "template": template,
                 "n_messages": len(messages), "seed": seed,
                 # persona prompts are stored once per record (`personas`), not at every turn
                 "prompt": None if template in PERSONA_TEMPLATES or prompt is None else prompt}
        self.transcript.append(entry)  # in the order the calls were made, whatever order they end in
        reply = await client.chat(messages, seed)
        entry.update(reply=reply.text, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                     truncated=reply.truncated)
        if reply.endpoint:
            entry["endpoint"] = reply.endpoint
        return reply.text

    async def patient_turn(self, step: str, persona: str) -> str:
        template = "patient_cbt" if self.ctx.settings.symptom_encoder == "on" else "patient_neutral"
        if self.conv.mode == "reference":  # the persona is the user message, as in the reference
            return await self.shared(step, "patient", template, persona, public=True)
        return await self.shared(step, "patient", template, None, system=persona, public=True)

    async def doctor_turn(self, step: str, system: str) -> str:
        return await self.shared(step, "doctor", "doctor_continue", self.render("doctor_continue"),
                                 system=system, public=True)


# ---------------------------------------------------------------- the session, METHOD.md §4
async def run_session(patient: dict, sample: int, ctx: "Arena") -> dict:
    s, cfg, started = Session(patient, sample, ctx), ctx.settings, time.time()
    slots = profile_slots(patient, cfg.emotion_format)

    if cfg.symptom_encoder == "on":
        # 1-2. Principle selection and the principles every dialogue persona must follow.
        principles = await choose_principles(s)
        persona_a = "\n".join([s.render("patient_cbt", **slots),
                               s.render("principles_header", principles="\n".join(principles["principles"]))])
        persona_b = s.render("patient_imagine", **slots)  # 3b: for the fresh calls of steps 9-11
        personas = {"patient_cbt": persona_a, "patient_imagine": persona_b}
    else:
        # Ablation "w/o Symptom Encoder": no principle selection (no judge call) and no cognitive
        # model; every patient call (dialogue turns and the fresh calls of steps 9-11) gets the one
        # neutral description of prompts/patient_neutral.txt (name, this week's situation, emotions).
        principles = None
        persona_a = persona_b = s.render("patient_neutral", **slots)
        personas = {"patient_neutral": persona_a}

    # 4-5. Opening, then the dialogue rounds.
    doctor_system = s.render("doctor_system")
    await s.patient_turn("opening.patient", persona_a)
    for r in range(1, cfg.dialogue_rounds + 1):
        await s.doctor_turn(f"dialogue.{r}.doctor", doctor_system)
        await s.patient_turn(f"dialogue.{r}.patient", persona_a)

    # 6-7. Symptom Decoder; while the judge has feedback, more rounds (at most max_decode_rounds).
    # Ablation "w/o Symptom Decoder": no questions, no feedback rounds; straight to the diagnoses.
    chosen = principles["principles"] if principles else None
    decoded = [await decode_symptoms(s, chosen, 0)] if cfg.symptom_decoder == "on" else []
    while decoded and decoded[-1]["feedback"] and len(decoded) <= cfg.max_decode_rounds:
        r = len(decoded)
        system = doctor_system
        if cfg.feedback_mode == "steer":
            system = s.render("doctor_feedback", doctor_system=doctor_system, feedback=decoded[-1]["feedback"])
        # (reference mode: the reference built this steered prompt and discarded it)
        await s.doctor_turn(f"decode.{r}.doctor", system)
        await s.patient_turn(f"decode.{r}.patient", persona_a)
        decoded.append(await decode_symptoms(s, chosen, r))

    # 8. Two different diagnoses inside the conversation.
    diagnosis_system = s.render("diagnosis_system")
    d1 = await s.shared("diagnosis.1", "doctor", "diagnosis_first", s.render("diagnosis_first"), diagnosis_system)
    d2 = await s.shared("diagnosis.2", "doctor", "diagnosis_second", s.render("diagnosis_second"), diagnosis_system)
    # 9. The patient reviews both (fresh, persona b); a fresh base call names the final illness.
    review = await s.fresh("diagnosis.review", "patient", "base", "patient_review",
                           s.render("patient_review", diagnosis_1=d1, diagnosis_2=d2), persona_b)
    # "name": the illness name only; "reference": the reference's question (which one is more
    # accurate), whose answers often read "Doctor 1's diagnosis ... is more accurate"
    final = "final_illness" if cfg.illness_prompt == "name" else "final_illness_reference"
    illness = await s.fresh("diagnosis.final", "assistant", "base", final, s.render(final, review=review))

    # 10. Try and reflect, for a treatment then for a medicine.
    treatment = await try_and_reflect(s, illness, persona_b, "treatment")
    medicine = await try_and_reflect(s, illness, persona_b, "medicine")

    # 11. Extraction of the four fields by the judge.
    candidates = treatment["best"] + "\n" + medicine["best"]
    # robust: labels with colons, read by the label-aware parser; reference: the reference's block
    # ("Explanation" without a colon) and its fixed-offset slicing, which misses a copied bare label
    template = "extraction" if cfg.extraction_parser == "robust" else "extraction_reference"
    extraction_reply = await s.fresh("extraction", "judge", "judge", template,
                                     s.render(template, candidates=candidates))
    parse = parse_extraction if cfg.extraction_parser == "robust" else parse_extraction_reference
    fields = parse(extraction_reply)

    return {
        "symptom": s.render("symptom", **slots), "illness": illness, **fields,
        "patient_id": patient["id"], "sample": sample, "patient_name": patient["name"],
        "diagnoses": [d1, d2], "patient_review": review, "principles": principles,
        "decoder": decoded, "feedback_rounds": max(len(decoded) - 1, 0),
        "treatment_search": treatment, "medicine_search": medicine, "extraction_reply": extraction_reply,
        "personas": personas,
        "transcript": s.transcript, "calls": len(s.transcript),
        "truncated_calls": sum(t["truncated"] for t in s.transcript),
        "models": {"base": ctx.base.name, "judge": ctx.judge.name, "encoder": cfg.encoder},
        "seed": cfg.seed, "settings": {**asdict(cfg), "sampling": ctx.sampling}, "settings_hash": cfg.digest(),
        "elapsed_s": round(time.time() - started, 2),
    }


async def choose_principles(s: Session) -> dict:
    """Step 1: the k groups most similar to the coping strategies; the judge picks one."""
    cfg, coping = s.ctx.settings, s.patient["coping_strategies"]
    top = s.ctx.rank_groups(coping, cfg.num_principle_groups)
    groups = "\n".join(f"Group {i}: " + " ".join(s.ctx.groups[g]) for i, (g, _) in enumerate(top, 1))
    reply = await s.fresh("principles.choice", "judge", "judge", "principle_choice",
                          s.render("principle_choice", coping_strategies=coping, groups=groups))
    number = parse_group_number(reply, len(top))
    # No usable number: the best-similarity group (the reference crashed or kept raw text).
    chosen = top[(number or 1) - 1][0]
    return {"candidates": [{"group": g, "score": round(sc, 4)} for g, sc in top], "judge_reply": reply,
            "chosen_group": chosen, "fallback": number is None, "principles": s.ctx.groups[chosen]}


async def decode_symptoms(s: Session, principles: list[str] | None, round_: int) -> dict:
    """Step 6: the doctor states what it inferred; items below the threshold get judge feedback.
    principles None (--symptom_encoder off: none were encoded): no principles question or feedback."""
    p = s.patient
    questions = {
        "intermediate_belief": s.render("decode_intermediate_belief"),
        "intermediate_belief_depression": s.render("decode_intermediate_belief_depression"),
        "coping_strategies": s.render("decode_coping_strategies"),
        "situation": s.render("decode_situation", situation=p["situation"]),
    }
    truth = {
        "intermediate_belief": p["intermediate_belief"],
        "intermediate_belief_depression": p["intermediate_belief_depression"],
        "coping_strategies": p["coping_strategies"],
        "situation": s.render("decoder_truth_situation", **profile_slots(p, s.ctx.settings.emotion_format)),
    }
    if principles is not None:
        questions["principles"] = s.render("decode_principles")
        truth["principles"] = " ".join(principles)
    answers = {}
    for key, question in questions.items():
        answers[key] = await s.shared(f"decode.{round_}.{key}", "doctor", f"decode_{key}", question)
    keys = list(questions)
    sims = dict(zip(keys, s.ctx.encoder.similarities([(answers[k], truth[k]) for k in keys])))
    below = [k for k in keys if sims[k] < s.ctx.settings.similarity_threshold]
    judge_calls = []
    cognitive = [k for k in DECODER_ITEMS if k in below]
    if cognitive:
        judge_calls.append(s.fresh(f"decode.{round_}.feedback", "judge", "judge", "judge_cognitive_feedback",
                                   s.render("judge_cognitive_feedback",
                                            truth="\n".join(f"{k}:\n{truth[k]}" for k in cognitive),
                                            answers="\n".join(f"{k}:\n{answers[k]}" for k in cognitive))))
    if "principles" in below:
        judge_calls.append(s.fresh(f"decode.{round_}.principle_feedback", "judge", "judge",
                                   "judge_principle_feedback",
                                   s.render("judge_principle_feedback", principles=truth["principles"],
                                            answer=answers["principles"])))
    # Empty or blank judge replies are no feedback: the reference concatenated them into "" and
    # stopped; joining two blanks with a newline would force another round for nothing.
    feedback = "\n".join(text for text in (r.strip() for r in await asyncio.gather(*judge_calls)) if text)
    return {"round": round_, "similarities": {k: round(v, 4) for k, v in sims.items()},
            "below_threshold": below, "feedback": feedback}


async def try_and_reflect(s: Session, illness: str, persona_b: str, kind: str) -> dict:
    """Step 10: propose, let the patient imagine the effect, let the judge score it; keep the best."""
    cfg, tries, best, best_score = s.ctx.settings, [], None, 0
    system = s.render("treatment_system")
    while len(tries) < cfg.max_tries and best_score < cfg.target_score:
        n = len(tries) + 1
        template = f"{kind}_first" if n == 1 else f"{kind}_next"
        candidate = await s.shared(f"{kind}.{n}.doctor", "doctor", template,
                                   s.render(template, illness=illness), system)
        state = await s.fresh(f"{kind}.{n}.patient", "patient", "base", f"patient_after_{kind}",
                              s.render(f"patient_after_{kind}", candidate=candidate), persona_b)
        rating = await s.fresh(f"{kind}.{n}.score", "judge", "judge", "judge_health_score",
                               s.render("judge_health_score", state=state), persona_b)
        score = SCORE_PARSERS[cfg.score_parser](rating)  # 0: no score on the scale
        tries.append({"candidate": candidate, "patient_state": state, "judge_reply": rating, "score": score})
        if score > best_score:  # strictly higher, as the reference
            best, best_score = candidate, score
    # Every score 0 (none on the scale): keep the first candidate; the reference crashed here.
    return {"best": best if best is not None else tries[0]["candidate"], "best_score": best_score,
            "fallback": best is None, "tries": tries}


def profile_slots(patient: dict, emotion_format: str = "joined") -> dict:
    """The profile's fields as prompt slots. Emotions are a list in Patient-Psi profiles: "joined" writes
    them "anxious, worried; sad, down"; "reference" as the reference's f-strings did, Python's own
    rendering of the list ("['anxious, worried', 'sad, down']"), into `symptom` and every prompt."""
    emotion = patient["emotion"]
    if isinstance(emotion, list):
        emotion = "; ".join(emotion) if emotion_format == "joined" else str(emotion)
    return {**patient, "emotion": emotion}


# ---------------------------------------------------------------- running many sessions
class Arena:
    """What all sessions share: settings, prompts, clients, encoder, principle groups."""

    def __init__(self, settings, prompts, base, judge, encoder, groups):
        self.settings, self.prompts, self.base, self.judge = settings, prompts, base, judge
        self.encoder, self.groups = encoder, groups
        # the top-p / top-k each role's backend resolved (from flags, the checkpoint or the server)
        self.sampling = {role: getattr(getattr(client, "backend", None), "sampling", None)
                         for role, client in (("base", base), ("judge", judge))}

    def rank_groups(self, text: str, k: int) -> list[tuple[str, float]]:
        return top_k_groups(self.encoder, self.groups, text, k)


async def run_all(arena: Arena, todo: list[tuple[dict, int]], output: Path, errors: Path,
                  concurrency: int, progress=None) -> dict:
    """Keep `concurrency` sessions in flight; write each record whole as soon as it finishes."""
    queue = list(reversed(todo))
    gate = arena.base.gate
    counts = {"ok": 0, "failed": 0, "decoder": []}

    async def worker():
        while queue:
            patient, sample = queue.pop()
            gate.active += 1
            calls = None  # a failed session's calls are not known here
            try:
                record = await run_session(patient, sample, arena)
            except ServiceRefused:
                raise  # the service refused the run (a key without credit, ...): every session would fail
            except Exception as exc:  # noqa: BLE001 - one failed session must not stop the run
                counts["failed"] += 1
                log.error("session %s/%s failed: %s", patient["id"], sample, exc)
                append_jsonl(errors, {"patient_id": patient["id"], "sample": sample,
                                      "error": f"{type(exc).__name__}: {exc}", "time": time.time()})
            else:
                counts["ok"] += 1
                append_jsonl(output, record)
                counts["decoder"].append(record["decoder"])
                calls = record["calls"]
            finally:
                gate.active -= 1
                gate.notify()
            if progress is not None:
                progress.session(calls)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return counts


def content_hash(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class _DryClient:
    """Answers every call with "1" at once: a score that never reaches the target, a group number,
    feedback that is never empty. So a dry session takes every branch and renders every template."""
    name = "dry"

    async def chat(self, messages, seed=None):
        return Reply("1")


class _DryEncoder:
    name = "dry"

    def similarities(self, pairs):
        return [0.0] * len(pairs)  # below any threshold: every decoder round and feedback call happens


def dry_run(settings: Settings, prompts: Prompts, groups: dict, patient: dict) -> None:
    """One session on stand-ins, before any model loads, so that a prompt file with a slot the
    session does not fill (or a broken brace) is one line now, not an error in every session."""
    client = _DryClient()
    arena = Arena(settings, prompts, client, client, _DryEncoder(), groups)
    arena.rank_groups = lambda text, k: [(g, 0.0) for g in list(groups)[:max(k, 1)]]
    asyncio.run(run_session(patient, 0, arena))


def pending_sessions(patients: list[dict], num_samples: int, output: Path, settings_hash: str):
    """Sessions not yet in the output; refuses to mix records made with other settings."""
    done = set()
    for number, row in enumerate(read_jsonl(output, allow_torn_tail=True), 1):
        if "patient_id" not in row:
            raise InputError(f"{output}: line {number}: field \"patient_id\" is missing "
                             "(not an output of this script); choose another --output_file")
        if row.get("settings_hash") != settings_hash:
            raise InputError(f"{output}: line {number}: made with other settings (hash "
                             f"{row.get('settings_hash')} != {settings_hash}); use a new --output_file")
        done.add((str(row["patient_id"]), row["sample"]))
    return [(p, k) for p in patients for k in range(num_samples) if (p["id"], k) not in done], len(done)


PROMPT_NAMES = [
    "patient_cbt", "patient_imagine", "principles_header", "principle_choice", "doctor_system",
    "doctor_continue", "doctor_feedback", "decode_intermediate_belief",
    "decode_intermediate_belief_depression", "decode_coping_strategies", "decode_situation",
    "decode_principles", "judge_cognitive_feedback", "judge_principle_feedback", "diagnosis_system",
    "diagnosis_first", "diagnosis_second", "patient_review", "treatment_system",
    "treatment_first", "treatment_next", "medicine_first", "medicine_next", "patient_after_treatment",
    "patient_after_medicine", "judge_health_score", "symptom", "decoder_truth_situation",
    "roles_opening",
]


ENCODER_PROMPTS = ("patient_cbt", "patient_imagine", "principles_header", "principle_choice", "decode_principles",
                   "judge_principle_feedback")
DECODER_PROMPTS = ("doctor_feedback", "decode_intermediate_belief", "decode_intermediate_belief_depression",
                   "decode_coping_strategies", "decode_situation", "decode_principles", "judge_cognitive_feedback",
                   "judge_principle_feedback", "decoder_truth_situation")


def prompt_names(illness_prompt: str, extraction_parser: str = "robust", symptom_encoder: str = "on",
                 symptom_decoder: str = "on") -> list[str]:
    """The templates a run reads (and hashes): the common ones, the chosen final-illness question
    and the extraction block that goes with the chosen parser. An ablation leaves out the templates
    of the component it removes (--symptom_encoder off: the neutral persona takes their place)."""
    dropped = (ENCODER_PROMPTS if symptom_encoder == "off" else ()) + (DECODER_PROMPTS if symptom_decoder == "off" else ())
    names = [n for n in PROMPT_NAMES if n not in dropped] + (["patient_neutral"] if symptom_encoder == "off" else [])
    return names + ["final_illness" if illness_prompt == "name" else "final_illness_reference",
                           "extraction" if extraction_parser == "robust" else "extraction_reference"]


def run(
    # models
    base_model: str | None = None,     # None: the embedded SmolLM2-135M-Instruct; a path / org/name: hf; else OpenAI
    backend: str = "auto",             # auto | embedded | hf | openai (rule: mentalarena.engines.backends.resolve_backend)
    api_base: str | None = None,       # an OpenAI-compatible server (vLLM, llama.cpp, Ollama), or replicas as a comma list
    judge_model: str | None = None,    # helper calls (paper: gpt-4-turbo-2024-04-09); None: the base model
    judge_backend: str = "auto",
    judge_api_base: str | None = None,  # None: where the base model is served (rule: mentalarena.engines.backends.judge_route)
    api_key_env: str | None = None,    # the environment variable holding --api_base's key (None: no key; the
                                       #   OpenAI API always gets OPENAI_API_KEY and no other server does)
    judge_api_key_env: str | None = None,  # the same for --judge_api_base (None: the base model's, when served there)
    request_timeout: float = 600.0,    # served models: seconds one request may take in all (a trickling server fails)
    merge_system: bool = False,        # system text into the user turn, for templates without a system role
    encoder_model: str | None = None,  # sentence encoder; None: bundled all-MiniLM-L6-v2; bert-base-uncased = paper
    similarity_threshold: float | None = None,  # None: the encoder's calibrated value (0.9 for bert-base-uncased)
    # data
    patients_file: str | None = None,  # Patient-Psi-CM JSON list; None: data/sample_patients.json
    principles_file: str | None = None,  # roleplay-doh CSV or grouped JSON; None: data/sample_principles.csv
    output_file: str = "outputs/arena.jsonl",
    prompt_dir: str | None = None,     # folder of prompt templates; None: prompts/
    limit: int | None = None,          # first N patients only
    num_samples: int = 1,              # sessions per patient
    # method constants (paper defaults)
    temperature: float = 0.8,
    max_new_tokens: int = 256,
    dialogue_rounds: int = 4,
    num_principle_groups: int = 5,
    max_decode_rounds: int = 5,
    max_tries: int = 7,
    target_score: int = 9,
    feedback_mode: str = "steer",      # steer: decoder feedback reaches the doctor; reference: dropped
    history_mode: str = "reference",   # reference: the reference's shared message list; roles: role-separated
    extraction_parser: str = "robust",  # robust | reference (the reference's block and fixed-offset slicing)
    score_parser: str = "robust",      # robust: the 1-10 health rating, off the scale (32, "32 %") unscored;
                                       #   reference: int() else the first integer (32 ends the search)
    illness_prompt: str = "name",      # name: the illness name only; reference: "which diagnosis is more accurate"
    emotion_format: str = "joined",    # joined: "anxious; sad"; reference: the reference's "['anxious', 'sad']"
    top_p: float | None = None,        # None: the checkpoint's generation config (as the reference's pipeline)
    top_k: int | None = None,          #   or the server's default; 0 turns top-k off
    # the paper's ablations (off: the component is left out; recorded in settings and the hash)
    symptom_encoder: str = "on",       # off: no principle selection (no judge call), no principles, no
                                       #   cognitive model; every patient call gets prompts/patient_neutral.txt
                                       #   (name, this week's situation, emotions, a 5-sentence cap) instead
                                       #   of patient_cbt/patient_imagine; the decoder skips its principles item
    symptom_decoder: str = "on",       # off: no decoder questions, no feedback rounds (dialogue rounds, then
                                       #   the diagnoses); records get decoder [] and feedback_rounds 0
    # running
    concurrency: int = 8,              # sessions in flight; their requests are batched together
    max_batch_size: int = 16,          # local backends: conversations per forward batch
    max_context_tokens: int | None = None,  # None: the model's own window (local: its config; API: the
                                            # server's report, else the known window of OpenAI's models)
    prefix_cache_gb: float = 8.0,      # local backends: memory for cached key/values of prompt prefixes (0: off)
    device: str | None = None,
    dtype: str | None = "auto",      # local weights: auto (bfloat16 where the device has it, else float32) | float32 | ...
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the self-play sessions and append one record per session to `output_file`."""
    check_numbers(run, dict(locals()))
    check_choice("feedback_mode", feedback_mode, FEEDBACK_MODES)
    check_choice("history_mode", history_mode, HISTORY_MODES)
    check_choice("extraction_parser", extraction_parser, ("robust", "reference"))
    check_choice("illness_prompt", illness_prompt, ILLNESS_PROMPTS)
    check_choice("symptom_encoder", symptom_encoder, SWITCHES)
    check_choice("symptom_decoder", symptom_decoder, SWITCHES)
    check_choice("score_parser", score_parser, tuple(SCORE_PARSERS))
    check_choice("emotion_format", emotion_format, EMOTION_FORMATS)
    # Validate every input before any model loads or any file is touched.
    dtype = auto_dtype(dtype, device)
    all_patients = load_patients(patients_file or DEFAULT_PATIENTS_FILE)
    patients = all_patients[:limit]
    groups = load_principles(principles_file or DEFAULT_PRINCIPLES_FILE)
    prompts = Prompts(prompt_dir)
    names = prompt_names(illness_prompt, extraction_parser, symptom_encoder, symptom_decoder)
    prompts.check(names)
    base_route = route(base_model, backend, api_base, api_key_env)
    judge = judge_route(base_route, judge_model, judge_backend, judge_api_base, judge_api_key_env)
    for r in (base_route, judge):
        if r is not None:
            require_credentials(r)
    encoder_name = encoder_model or BUNDLED_NAME
    threshold = similarity_threshold if similarity_threshold is not None else threshold_for(encoder_name)
    if threshold is None:
        raise InputError(f"--encoder_model {encoder_model}: no calibrated threshold for this encoder; "
                         "pass --similarity_threshold (benchmarks/calibrate_threshold.py derives one)")
    prompts_hash = hashlib.sha256("".join(prompts.template(n) for n in names).encode()).hexdigest()[:16]
    settings = Settings(
        base_model=base_model or "embedded", judge_model=judge_model or base_model or "embedded",
        encoder=encoder_name, similarity_threshold=threshold, temperature=temperature,
        max_new_tokens=max_new_tokens, dialogue_rounds=dialogue_rounds,
        num_principle_groups=num_principle_groups, max_decode_rounds=max_decode_rounds,
        max_tries=max_tries, target_score=target_score, feedback_mode=feedback_mode,
        history_mode=history_mode, merge_system=merge_system, extraction_parser=extraction_parser,
        illness_prompt=illness_prompt, seed=seed, prompts_hash=prompts_hash, top_p=top_p, top_k=top_k,
        max_context_tokens=max_context_tokens, base_runs_on=runs_on(base_route),
        judge_runs_on=runs_on(judge or base_route), patients_hash=content_hash(all_patients),
        dtype=dtype if any(r is not None and r.kind != "openai" for r in (base_route, judge)) else None,
        principles_hash=content_hash(groups), symptom_encoder=symptom_encoder, symptom_decoder=symptom_decoder,
        score_parser=score_parser, base_fingerprint=_fingerprint(base_route),
        judge_fingerprint=_fingerprint(judge) if judge is not None else "", emotion_format=emotion_format)
    if patients:
        dry_run(settings, prompts, groups, patients[0])  # every template rendered, as a session would
    output = Path(output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    errors = output.with_name(output.stem + ".errors.jsonl")
    with OutputLock(output):  # before reading it: a live run on the same output may be writing it
        todo, already = pending_sessions(patients, num_samples, output, settings.digest())
        _seed_everything(seed)
        print(f"[arena] {len(patients)} patients x {num_samples} samples: {already} done, {len(todo)} to run "
              f"-> {output}", flush=True)
        print("[arena] settings " + json.dumps(asdict(settings)), flush=True)
        print("[arena] routes: " + describe_routes(base_route, judge), flush=True)
        if not todo:
            return {"sessions_ok": 0, "sessions_failed": 0, "skipped": already}
        repair_torn_tail(output)  # every check passed: only now is the output touched
        common = dict(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                      max_parallel=max(16, 4 * concurrency), device=device, dtype=dtype,
                      max_batch_size=max_batch_size, max_context_tokens=max_context_tokens,
                      prefix_cache_gb=prefix_cache_gb, top_p=top_p, top_k=top_k, request_timeout=request_timeout)
        clients = _clients([base_route] + ([judge] if judge else []), common, merge_system)
        bar = None
        try:
            encoder = Encoder(encoder_model)
            arena = Arena(settings, prompts, clients[0], clients[-1], encoder, groups)
            print("[arena] sampling: " + describe_sampling(arena.sampling, temperature), flush=True)
            if progress:
                bar = SessionProgress(len(todo), expected_calls(settings))
                for client in clients:
                    client.on_reply = bar.reply
            if errors.exists():
                errors.unlink()  # the errors file reports the latest run only
            started = time.time()
            counts = asyncio.run(run_all(arena, todo, output, errors, concurrency, bar))
        finally:
            if bar is not None:
                bar.close()
            for client in clients:
                client.close()
        summary = _summary(counts, already, arena, time.time() - started, output, errors)
        write_json_atomic(output.with_name(output.stem + ".summary.json"), summary)
    return summary


def _fingerprint(r) -> str:
    """A local model folder's content fingerprint; "" for hub ids, API models and the embedded model."""
    return (model_fingerprint(r.model) or "") if r.kind == "hf" else ""


def _clients(routes, common: dict, merge_system: bool) -> list[ModelClient]:
    """One client per route (base, then judge if it has its own). Servers are reached first, so a
    wrong address, key or model name stops the run in seconds, before any local model loads."""
    from mentalarena.engines.backends import make_backend

    gate, built = Gate(), {}
    try:
        for r in sorted(routes, key=lambda r: r.kind != "openai"):
            backend = checked(make_backend(r.model, r.kind, r.api_base, key_env=r.key_env, key_flag=r.key_flag,
                                           **common), "arena")
            built[id(r)] = ModelClient(backend, gate, common["max_new_tokens"], merge_system,
                                       max_parallel=common["max_parallel"])
    except BaseException:
        for client in built.values():
            client.close()
        raise
    return [built[id(r)] for r in routes]


def expected_calls(cfg: Settings) -> int:
    """The most calls a session can make (the progress bar's first estimate, refined as sessions
    end): the fixed steps, every extra decoder round with both feedback calls, every try."""
    encoder = cfg.symptom_encoder == "on"
    decode = 7 if encoder else 5  # questions and feedback calls (no principles item without the encoder)
    decoder = decode + (2 + decode) * cfg.max_decode_rounds if cfg.symptom_decoder == "on" else 0
    fixed = encoder + 1 + 2 * cfg.dialogue_rounds + 4 + 1  # principles, opening, dialogue, diagnosis, extraction
    return fixed + decoder + 2 * 3 * cfg.max_tries


def _summary(counts, already, arena, wall, output, errors) -> dict:
    clients = {"base": arena.base.stats_dict()}
    if arena.judge is not arena.base:
        clients["judge"] = arena.judge.stats_dict()
    done = counts["ok"] + counts["failed"]
    summary = {"sessions_ok": counts["ok"], "sessions_failed": counts["failed"], "skipped": already,
               "wall_seconds": round(wall, 1),
               "sessions_per_hour": round(3600 * done / wall, 2) if wall else 0.0,
               "model_calls": sum(c["calls"] for c in clients.values()),
               "prompt_tokens": sum(c["prompt_tokens"] for c in clients.values()),
               "completion_tokens": sum(c["completion_tokens"] for c in clients.values()),
               "truncated_calls": sum(c["truncated_calls"] for c in clients.values()),
               "decoder": decoder_stats(counts["decoder"], arena.settings.max_decode_rounds,
                                        arena.settings.similarity_threshold)
               if arena.settings.symptom_decoder == "on" else {"symptom_decoder": "off"},
               "clients": clients, "output_file": str(output),
               "errors_file": str(errors) if counts["failed"] else None}
    print("[arena] summary " + json.dumps(summary), flush=True)
    print("[arena] decoder: " + describe_decoder(summary["decoder"]), flush=True)
    for role, stats in clients.items():
        servers = stats.get("endpoints") or {}
        if len(servers) > 1:
            print(f"[arena] {role} endpoints: " + "; ".join(
                f"{url} ok {c['ok']}, errors {c['errors']}" + (f", left the rotation {c['removed']}x" if c["removed"] else "")
                for url, c in servers.items()), flush=True)
    return summary


def describe_sampling(sampling: dict, temperature: float) -> str:
    """The start-up line: the temperature, top-p and top-k each role samples with, and their origin."""
    parts = []
    for role, used in sampling.items():
        if role == "judge" and used is sampling.get("base"):
            continue
        if not used:
            parts.append(f"{role}: backend defaults")
            continue
        cells = [f"{k} {used[k] if used[k] is not None else 'unset'} ({used['source'][k]})" for k in ("top_p", "top_k")]
        parts.append(f"{role}: " + ", ".join(cells))
    return f"temperature {temperature}; " + "; ".join(parts)


def _quantiles(values: list[float]) -> dict:
    import numpy as np
    if not values:
        return {"n": 0}
    q = np.percentile(values, [10, 50, 90])
    return {"n": len(values), "mean": round(float(np.mean(values)), 4), "p10": round(float(q[0]), 4),
            "p50": round(float(q[1]), 4), "p90": round(float(q[2]), 4)}


def decoder_stats(decoders: list[list[dict]], cap: int, threshold: float) -> dict:
    """What the Symptom Decoder did in these sessions: how many feedback rounds each took (and how
    many stopped only at the cap, feedback still pending), and each item's similarity to the
    encoded truth in the first and in every round, with the share at or above the threshold."""
    rounds = [len(d) - 1 for d in decoders]
    capped = sum(len(d) - 1 == cap and bool(d[-1]["feedback"]) for d in decoders)
    items = sorted({k for d in decoders for r in d for k in r["similarities"]})
    per_item = {}
    for item in items:
        first = [d[0]["similarities"][item] for d in decoders if item in d[0]["similarities"]]
        every = [r["similarities"][item] for d in decoders for r in d if item in r["similarities"]]
        per_item[item] = {"first_round": _quantiles(first), "all_rounds": _quantiles(every),
                          "pass_share_first_round": round(sum(v >= threshold for v in first) / len(first), 4)
                          if first else None}
    return {"sessions": len(decoders), "threshold": threshold, "cap": cap,
            "feedback_rounds": {str(n): rounds.count(n) for n in range(cap + 1)},
            "mean_feedback_rounds": round(sum(rounds) / len(rounds), 3) if rounds else None,
            "stopped_at_cap": capped, "stopped_at_cap_share": round(capped / len(rounds), 4) if rounds else None,
            "all_items_passed_first_round": sum(not d[0]["below_threshold"] for d in decoders),
            "similarity": per_item}


def describe_decoder(stats: dict) -> str:
    if stats.get("symptom_decoder") == "off":
        return "off (--symptom_decoder off): no decoder questions, no feedback rounds"
    if not stats["sessions"]:
        return "no sessions"
    hist = ", ".join(f"{k}: {v}" for k, v in stats["feedback_rounds"].items())
    items = "; ".join(f"{k} {v['first_round']['p50']:.2f} ({100 * v['pass_share_first_round']:.0f}% pass)"
                      for k, v in stats["similarity"].items())
    return (f"feedback rounds per session {{{hist}}}, {stats['stopped_at_cap']} of {stats['sessions']} "
            f"stopped at the cap of {stats['cap']} with feedback pending; first-round median similarity "
            f"(threshold {stats['threshold']}): {items}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    import numpy as np
    import torch
    np.random.seed(seed)
    torch.manual_seed(seed)


def report(input_file: str, output_dir: str = "outputs/report", labels: str | None = None,
           perplexity_model: str = "embedded", max_records: int | None = None, encoder_model: str | None = None) -> dict:
    """`arena_med.py report --input_file A.jsonl[,B.jsonl,...] --output_dir DIR`: DIR/report.md and
    PNG figures comparing record files (mentalarena/reports/report.py). `--labels a,b` names the files (default:
    their stems); `--perplexity_model embedded|none|<model>` scores the SFT answers; `--max_records N`
    reads each file's first N records; `--encoder_model none` skips the embedding diversity."""
    check_numbers(report, dict(locals()))
    from mentalarena.reports.report import write_report
    return write_report(input_file, output_dir, labels, perplexity_model, max_records, encoder_model)


COMMANDS = {"report": report}  # a first word naming a command; anything else is self-play (`run`)


def main(argv: list[str] | None = None) -> int:
    """`arena_med.py [run] --flag ...` or `report ...`. Exit 0 when every session was written, 1 when
    some failed (a re-run retries them), when a service refused the run or an output could not be
    written (what was written resumes), 2 on bad input."""
    return cli.main(COMMANDS, run, _exit_code, argv)


def _exit_code(command, summary) -> int:
    if command is not run:
        return 0
    return 1 if isinstance(summary, dict) and summary.get("sessions_failed") else 0


if __name__ == "__main__":
    sys.exit(main())
