"""One whole session through a scripted backend, checked message by message against the
reference sequence (METHOD.md §4), rebuilt here independently with a plain mutable list."""
from __future__ import annotations

import asyncio

import pytest
from conftest import ScriptedBackend

import arena_med as am
from mentalarena.selfplay.data import DEFAULT_PATIENTS_FILE, DEFAULT_PRINCIPLES_FILE, load_patients, load_principles
from mentalarena.engines.engine import Gate, ModelClient
from mentalarena.prompts import Prompts

P = Prompts()
FEEDBACK = "Ask about sleep."


class CountingBackend(ScriptedBackend):
    """Replies 'R<n>' for the n-th call, except for the judge's group, score and extraction prompts."""

    def __init__(self, scores):
        super().__init__()
        self.scores = list(scores)

    def reply_for(self, messages):
        last, n = messages[-1]["content"], len(self.seen)
        if "number of the best group" in last:
            return "I would choose Group 2."
        if "Rate this health state" in last:
            return f"{self.scores.pop(0)}"
        if "What should the doctor ask" in last:
            return FEEDBACK
        if "extract the treatment" in last:
            return "Treatment: CBT\nExplanation: it helps\nMedicine: sertraline\nExplanation: an SSRI"
        return f"R{n}"

    def generate(self, conversations, seeds=None):
        out = []
        for i, conv in enumerate(conversations):  # one at a time so the reply counter follows the call order
            out += super().generate([conv], None if seeds is None else seeds[i:i + 1])
        return out


class FixedEncoder:
    """Every pair scores 0.1: below any threshold, so the decoder always asks for feedback."""
    name = "fixed"

    def similarities(self, pairs):
        return [0.1] * len(pairs)


def make_arena(backend, prompts=P, **overrides):
    settings = am.Settings(base_model="scripted", judge_model="scripted", encoder="fixed",
                           similarity_threshold=0.5, **overrides)
    client = ModelClient(backend, Gate(), 256)
    groups = load_principles(DEFAULT_PRINCIPLES_FILE)
    arena = am.Arena(settings, prompts, client, client, FixedEncoder(), groups)
    ranked = [(g, 1.0 - i / 100) for i, g in enumerate(groups)]  # group order = file order
    arena.rank_groups = lambda text, k: ranked[:k]
    return arena


def run_one(arena, patient):
    arena.base.gate.active = 1
    return asyncio.run(am.run_session(patient, 0, arena))


def expected_sequence(patient, groups, settings, reply, feedback_mode):
    """The reference's message lists: one shared list, replies appended as system messages."""
    sent, shared = [], []
    slots = am.profile_slots(patient)

    def call(prompt, system=None, history=None, role=None):
        msgs = history if history is not None else []
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": prompt})
        sent.append([dict(m) for m in msgs])
        text = reply(msgs, len(sent) - 1)
        if role:
            msgs.append({"role": "system", "content": f"{role}: {text}"})
        return text

    top = list(groups)[:settings.num_principle_groups]
    listing = "\n".join(f"Group {i}: " + " ".join(groups[g]) for i, g in enumerate(top, 1))
    call(P.render("principle_choice", coping_strategies=patient["coping_strategies"], groups=listing))
    principles = groups[top[1]]  # "Group 2"
    persona_a = P.render("patient_cbt", **slots) + "\n" + P.render("principles_header", principles="\n".join(principles))
    persona_b = P.render("patient_imagine", **slots)
    doctor = P.render("doctor_system")
    call(persona_a, history=shared, role="Patient")
    for _ in range(settings.dialogue_rounds):
        call(P.render("doctor_continue"), doctor, shared, "Doctor")
        call(persona_a, history=shared, role="Patient")

    def decode():
        for q in ["decode_intermediate_belief", "decode_intermediate_belief_depression",
                  "decode_coping_strategies"]:
            call(P.render(q), history=shared, role="Doctor")
        call(P.render("decode_situation", situation=patient["situation"]), history=shared, role="Doctor")
        call(P.render("decode_principles"), history=shared, role="Doctor")
        call("COGNITIVE-FEEDBACK")  # placeholders, compared by their template below
        call("PRINCIPLE-FEEDBACK")

    decode()
    for _ in range(settings.max_decode_rounds):
        system = doctor if feedback_mode == "reference" else P.render(
            "doctor_feedback", doctor_system=doctor, feedback=FEEDBACK + "\n" + FEEDBACK)
        call(P.render("doctor_continue"), system, shared, "Doctor")
        call(persona_a, history=shared, role="Patient")
        decode()
    dsys = P.render("diagnosis_system")
    d1 = call(P.render("diagnosis_first"), dsys, shared, "Doctor")
    d2 = call(P.render("diagnosis_second"), dsys, shared, "Doctor")
    review = call(P.render("patient_review", diagnosis_1=d1, diagnosis_2=d2), persona_b)
    illness = call(P.render("final_illness", review=review))
    best = {}
    for kind in ("treatment", "medicine"):
        tsys = P.render("treatment_system")
        scores = []
        for n in range(settings.max_tries):
            template = f"{kind}_first" if n == 0 else f"{kind}_next"
            cand = call(P.render(template, illness=illness), tsys, shared, "Doctor")
            state = call(P.render(f"patient_after_{kind}", candidate=cand), persona_b)
            score = int(call(P.render("judge_health_score", state=state), persona_b))
            if not scores or score > max(scores):
                best[kind] = cand
            scores.append(score)
            if score >= settings.target_score:
                break
    call(P.render("extraction", candidates=best["treatment"] + "\n" + best["medicine"]))
    return sent


@pytest.mark.parametrize("feedback_mode", ["steer", "reference"])
def test_whole_session_matches_reference_message_sequence(feedback_mode):
    patient = load_patients(DEFAULT_PATIENTS_FILE)[0]
    scores = [3, 5, 9, 2, 4, 1]  # treatment stops at 9 after 3 tries; medicine uses all 3 (best 4)
    backend = CountingBackend(scores)
    arena = make_arena(backend, max_decode_rounds=1, max_tries=3, feedback_mode=feedback_mode)
    record = run_one(arena, patient)

    replay = CountingBackend(scores)

    def replay_reply(msgs, n):  # same reply rule, same call counter as the backend
        replay.seen.append(msgs)
        return replay.reply_for(msgs)

    expected = expected_sequence(patient, arena.groups, arena.settings, replay_reply, feedback_mode)
    assert len(backend.seen) == len(expected) == record["calls"]
    for i, (got, want) in enumerate(zip(backend.seen, expected)):
        if want[-1]["content"].endswith("-FEEDBACK"):
            assert got[-1]["content"].startswith("This is the true" if want[-1]["content"][0] == "C"
                                                 else "These are the true"), i
            assert len(got) == 1, i
            continue
        assert got == want, f"call {i} ({record['transcript'][i]['step']}) differs"

    # The record: six paper fields and what the reference discarded.
    assert (record["treatment"], record["explain_t"]) == ("CBT", "it helps")
    assert (record["medicine"], record["explain_m"]) == ("sertraline", "an SSRI")
    assert record["principles"]["chosen_group"] == list(arena.groups)[1]
    assert record["feedback_rounds"] == 1 and record["decoder"][0]["feedback"] == FEEDBACK + "\n" + FEEDBACK
    assert [t["score"] for t in record["treatment_search"]["tries"]] == [3, 5, 9]
    assert [t["score"] for t in record["medicine_search"]["tries"]] == [2, 4, 1]
    assert record["treatment_search"]["best_score"] == 9 and record["medicine_search"]["best_score"] == 4
    assert record["symptom"].startswith("Patient History: ") and patient["situation"] in record["symptom"]
    assert record["settings"]["feedback_mode"] == feedback_mode


def test_feedback_reaches_doctor_only_in_steer_mode():
    patient = load_patients(DEFAULT_PATIENTS_FILE)[1]
    systems = {}
    for mode in ("steer", "reference"):
        backend = CountingBackend([1] * 20)
        run_one(make_arena(backend, max_decode_rounds=2, max_tries=1, feedback_mode=mode), patient)
        systems[mode] = [m["content"] for conv in backend.seen for m in conv[-2:-1]
                         if m["role"] == "system" and "psychiatric expert helping" in m["content"]]
    assert any(FEEDBACK in s for s in systems["steer"])
    assert not any(FEEDBACK in s for s in systems["reference"])


def test_fallbacks_for_unparseable_judge_replies():
    """No group number -> best-similarity group; every score 0 -> the first candidate."""
    patient = load_patients(DEFAULT_PATIENTS_FILE)[2]
    backend = ScriptedBackend(rules=[("number of the best group", "the first one"),
                                     ("Rate this health state", "quite good")], default="text")
    arena = make_arena(backend, max_decode_rounds=0, max_tries=2)
    record = run_one(arena, patient)
    assert record["principles"]["fallback"] and record["principles"]["chosen_group"] == list(arena.groups)[0]
    search = record["treatment_search"]
    assert search["fallback"] and search["best"] == search["tries"][0]["candidate"] and search["best_score"] == 0


@pytest.mark.parametrize("parser, scores", [("robust", [0, 0, 0]), ("reference", [32])])
def test_an_off_scale_health_score_does_not_end_the_search(parser, scores):
    """A judge answering "32" (no rating on 1-10): robust reads no score, so every try is made and the
    first candidate is kept; the reference's first integer takes 32 >= 9 and stops at try 1."""
    patient = load_patients(DEFAULT_PATIENTS_FILE)[1]
    backend = ScriptedBackend(rules=[("number of the best group", "Group 1"), ("Rate this health state", "32")],
                              default="text")
    record = run_one(make_arena(backend, max_decode_rounds=0, max_tries=3, score_parser=parser), patient)
    for search in (record["treatment_search"], record["medicine_search"]):
        assert [(t["judge_reply"], t["score"]) for t in search["tries"]] == [("32", s) for s in scores]
        assert search["best_score"] == max(scores) and search["fallback"] == (parser == "robust")
        assert search["best"] == search["tries"][0]["candidate"]
    assert record["settings"]["score_parser"] == parser


def test_roles_mode_separates_speakers():
    patient = load_patients(DEFAULT_PATIENTS_FILE)[3]
    backend = CountingBackend([9] * 4)
    record = run_one(make_arena(backend, history_mode="roles", max_decode_rounds=0, max_tries=1), patient)
    steps = [t["step"] for t in record["transcript"]]
    opening = backend.seen[steps.index("opening.patient")]
    assert opening[0]["role"] == "system" and opening[0]["content"].startswith("You are " + patient["name"])
    assert opening[1] == {"role": "user", "content": "Hi."}
    patient_turn = backend.seen[steps.index("dialogue.2.patient")]
    doctor_turn = backend.seen[steps.index("dialogue.2.doctor")]
    # each side sees its own lines as assistant and the other's as user; personas never accumulate
    assert [m["role"] for m in patient_turn] == ["system"] + ["user", "assistant"] * 2 + ["user"]
    assert patient_turn[1]["content"] == "Hi."
    assert sum(patient["name"] in m["content"] for m in patient_turn) == 1
    assert doctor_turn[0]["content"] == P.render("doctor_system")
    assert [m["role"] for m in doctor_turn[1:]] == ["user", "assistant", "user"]
    assert doctor_turn[-1]["content"].endswith(P.render("doctor_continue"))


def test_an_edited_prompt_file_changes_what_the_run_sends(tmp_path):
    import shutil

    from mentalarena.prompts import PROMPT_DIR
    shutil.copytree(PROMPT_DIR, tmp_path / "p")
    (tmp_path / "p" / "doctor_continue.txt").write_text("EDITED: ask one more question.\n")
    patient = load_patients(DEFAULT_PATIENTS_FILE)[0]
    sent = {}
    for label, prompts in (("stock", P), ("edited", Prompts(tmp_path / "p"))):
        backend = CountingBackend([9] * 4)
        run_one(make_arena(backend, prompts=prompts, max_decode_rounds=0, max_tries=1), patient)
        sent[label] = [m["content"] for conv in backend.seen for m in conv if m["role"] == "user"]
    assert any(c == "EDITED: ask one more question." for c in sent["edited"])
    assert not any("EDITED" in c for c in sent["stock"])


@pytest.mark.parametrize(
    ("judge_reply", "rounds", "feedback"),
    [
        ("", 0, ""),            # the reference: "" + "" == "", no further round
        ("   \n\t", 0, ""),     # whitespace only is no feedback either
        ("\n", 0, ""),
        ("Ask about sleep.", 2, "Ask about sleep.\nAsk about sleep."),
        ("  Ask about sleep.\n", 2, "Ask about sleep.\nAsk about sleep."),
    ],
)
def test_blank_judge_feedback_is_no_feedback(judge_reply, rounds, feedback):
    """Both feedback calls fire every round (FixedEncoder scores 0.1); blank replies end the decoder."""
    patient = load_patients(DEFAULT_PATIENTS_FILE)[0]
    backend = ScriptedBackend(rules=[("What should the doctor ask", judge_reply),
                                     ("Rate this health state", "9")], default="text")
    record = run_one(make_arena(backend, max_decode_rounds=2, max_tries=1), patient)
    assert record["feedback_rounds"] == rounds
    assert record["decoder"][0]["feedback"] == feedback
    steps = [t["step"] for t in record["transcript"]]
    assert ("decode.1.doctor" in steps) == (rounds > 0)
    assert sum(s.endswith(".feedback") for s in steps) == rounds + 1


def _round(n, sims, feedback):
    return {"round": n, "similarities": sims, "below_threshold": [k for k, v in sims.items() if v < 0.3],
            "feedback": feedback}


def test_decoder_stats_exactly_on_hand_made_sessions():
    a = [_round(0, {"x": 0.1, "y": 0.5}, "ask"), _round(1, {"x": 0.2, "y": 0.6}, "ask"),
         _round(2, {"x": 0.35, "y": 0.7}, "ask")]                         # at the cap (2), feedback pending
    b = [_round(0, {"x": 0.4, "y": 0.9}, "")]                              # passed at once
    c = [_round(0, {"x": 0.2, "y": 0.3}, "ask"), _round(1, {"x": 0.5, "y": 0.5}, "")]
    d = [_round(0, {"x": 0.0, "y": 0.0}, "ask"), _round(1, {"x": 0.1, "y": 0.1}, "ask"),
         _round(2, {"x": 0.9, "y": 0.9}, "")]                               # used the cap but ended passing
    stats = am.decoder_stats([a, b, c, d], cap=2, threshold=0.3)
    assert stats["feedback_rounds"] == {"0": 1, "1": 1, "2": 2}
    assert stats["mean_feedback_rounds"] == 1.25
    assert stats["stopped_at_cap"] == 1 and stats["stopped_at_cap_share"] == 0.25
    assert stats["all_items_passed_first_round"] == 1
    x = stats["similarity"]["x"]
    assert x["first_round"]["n"] == 4 and x["first_round"]["mean"] == pytest.approx((0.1 + 0.4 + 0.2 + 0.0) / 4)
    assert x["first_round"]["p50"] == pytest.approx(0.15)
    assert x["all_rounds"]["n"] == 9
    assert x["pass_share_first_round"] == 0.25                             # only b's 0.4
    assert stats["similarity"]["y"]["pass_share_first_round"] == 0.75      # 0.5, 0.9, 0.3 (>= 0.3)
    line = am.describe_decoder(stats)
    assert "{0: 1, 1: 1, 2: 2}" in line and "1 of 4 stopped at the cap of 2" in line
    assert am.decoder_stats([], cap=5, threshold=0.3)["sessions"] == 0


def test_run_summary_counts_feedback_rounds_from_the_records(tmp_path):
    """Through the real session loop: the summary's counts agree with the records written."""
    import json
    patients = load_patients(DEFAULT_PATIENTS_FILE)[:3]
    backend = CountingBackend([9] * 20)
    arena = make_arena(backend, max_decode_rounds=2, max_tries=1)
    out, errors = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    arena.base.gate.active = 0
    counts = asyncio.run(am.run_all(arena, [(p, 0) for p in patients], out, errors, 2))
    summary = am._summary(counts, 0, arena, 1.0, out, errors)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["decoder"]["sessions"] == len(rows) == 3
    # FixedEncoder scores 0.1: every round asks for feedback, so every session stops at the cap
    assert summary["decoder"]["feedback_rounds"] == {"0": 0, "1": 0, "2": 3}
    assert summary["decoder"]["stopped_at_cap"] == sum(r["feedback_rounds"] == 2 for r in rows) == 3


@pytest.mark.parametrize(("parser", "illness_prompt", "extraction_template", "illness_template"), [
    ("robust", "name", "extraction", "final_illness"),
    ("reference", "reference", "extraction_reference", "final_illness_reference"),
])
def test_prompt_variants_go_with_their_flags(parser, illness_prompt, extraction_template, illness_template):
    """--extraction_parser reference sends the reference's block (bare "Explanation") and slices it as
    the reference did; --illness_prompt reference asks the reference's question."""
    patient = load_patients(DEFAULT_PATIENTS_FILE)[0]
    reply = "Treatment: CBT\nExplanation: it helps\nMedicine: sertraline\nExplanation an SSRI"
    backend = ScriptedBackend(rules=[("extract the treatment", reply), ("Rate this health state", "9")],
                              default="text")
    record = run_one(make_arena(backend, max_decode_rounds=0, max_tries=1, extraction_parser=parser,
                                illness_prompt=illness_prompt), patient)
    steps = {t["step"]: t for t in record["transcript"]}
    assert steps["extraction"]["template"] == extraction_template
    assert steps["diagnosis.final"]["template"] == illness_template
    sent = steps["extraction"]["prompt"]
    assert ("\nExplanation\n" in sent) == (parser == "reference")
    assert steps["diagnosis.final"]["prompt"].startswith(P.template(illness_template).split("{")[0])
    # the bare "Explanation an SSRI" is read by the robust parser only
    assert record["explain_m"] == ("an SSRI" if parser == "robust" else "")
    assert record["explain_t"] == "it helps"
