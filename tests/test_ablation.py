"""The paper's ablations: --symptom_encoder off (a neutral patient, no cognitive model, no principles)
and --symptom_decoder off (no decoder questions, no feedback rounds). Each session is checked message
by message against a sequence rebuilt here with a plain list, as tests/test_session.py does for the
full method; then the settings, the hash, bad values, the dry run, the summary and iterate.py."""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from conftest import ScriptedBackend
from fake_openai import FakeOpenAI
from test_session import FEEDBACK, P, CountingBackend, make_arena, run_one

import arena_med as am
from mentalarena.selfplay.data import DEFAULT_PATIENTS_FILE, DEFAULT_PRINCIPLES_FILE, load_patients, load_principles
from mentalarena.prompts import PROMPT_DIR, Prompts

PATIENT = load_patients(DEFAULT_PATIENTS_FILE)[0]
# what the Symptom Encoder adds: none of it may reach the patient without it
COGNITIVE_FIELDS = ("history", "intermediate_belief", "intermediate_belief_depression", "coping_strategies",
                    "auto_thought", "behavior")


def expected_sequence(patient, settings, reply, encoder, decoder):
    """The reference's shared message list, with the ablated component left out."""
    sent, shared = [], []
    slots = am.profile_slots(patient)

    def call(prompt, system=None, history=None, role=None):
        msgs = history if history is not None else []
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": prompt})
        sent.append([dict(m) for m in msgs])
        text = reply(msgs)
        if role:
            msgs.append({"role": "system", "content": f"{role}: {text}"})
        return text

    groups = load_principles(DEFAULT_PRINCIPLES_FILE)
    if encoder:
        top = list(groups)[:settings.num_principle_groups]
        listing = "\n".join(f"Group {i}: " + " ".join(groups[g]) for i, g in enumerate(top, 1))
        call(P.render("principle_choice", coping_strategies=patient["coping_strategies"], groups=listing))
        header = P.render("principles_header", principles="\n".join(groups[top[1]]))
        persona_a, persona_b = P.render("patient_cbt", **slots) + "\n" + header, P.render("patient_imagine", **slots)
    else:
        persona_a = persona_b = P.render("patient_neutral", **slots)
    doctor = P.render("doctor_system")
    call(persona_a, history=shared, role="Patient")
    for _ in range(settings.dialogue_rounds):
        call(P.render("doctor_continue"), doctor, shared, "Doctor")
        call(persona_a, history=shared, role="Patient")

    # what the decoder's answers are compared with: the cognitive model, this week's situation as
    # decoder_truth_situation words it, and (with the encoder) the chosen group's principles
    truth = {"intermediate_belief": patient["intermediate_belief"],
             "intermediate_belief_depression": patient["intermediate_belief_depression"],
             "coping_strategies": patient["coping_strategies"],
             "situation": P.render("decoder_truth_situation", **am.profile_slots(patient, settings.emotion_format))}

    def decode():
        answers = {}
        for key in ["intermediate_belief", "intermediate_belief_depression", "coping_strategies"]:
            answers[key] = call(P.render(f"decode_{key}"), history=shared, role="Doctor")
        answers["situation"] = call(P.render("decode_situation", situation=patient["situation"]), history=shared,
                                    role="Doctor")
        if encoder:
            answers["principles"] = call(P.render("decode_principles"), history=shared, role="Doctor")
        # every item scores below the threshold (FixedEncoder): the judge gets all four, each as
        # "<item>:\n<text>", then (with the encoder) the principles; each prompt on its own
        call(P.render("judge_cognitive_feedback", truth="\n".join(f"{k}:\n{v}" for k, v in truth.items()),
                      answers="\n".join(f"{k}:\n{answers[k]}" for k in truth)))
        if encoder:
            call(P.render("judge_principle_feedback", principles=" ".join(groups[top[1]]),
                          answer=answers["principles"]))

    if decoder:
        decode()
        feedback = FEEDBACK + "\n" + FEEDBACK if encoder else FEEDBACK
        for _ in range(settings.max_decode_rounds):
            call(P.render("doctor_continue"), P.render("doctor_feedback", doctor_system=doctor, feedback=feedback),
                 shared, "Doctor")
            call(persona_a, history=shared, role="Patient")
            decode()
    dsys = P.render("diagnosis_system")
    d1 = call(P.render("diagnosis_first"), dsys, shared, "Doctor")
    d2 = call(P.render("diagnosis_second"), dsys, shared, "Doctor")
    review = call(P.render("patient_review", diagnosis_1=d1, diagnosis_2=d2), persona_b)
    illness = call(P.render("final_illness", review=review))
    best = {}
    for kind in ("treatment", "medicine"):
        scores = []
        for n in range(settings.max_tries):
            template = f"{kind}_first" if n == 0 else f"{kind}_next"
            cand = call(P.render(template, illness=illness), P.render("treatment_system"), shared, "Doctor")
            state = call(P.render(f"patient_after_{kind}", candidate=cand), persona_b)
            score = int(call(P.render("judge_health_score", state=state), persona_b))
            if not scores or score > max(scores):
                best[kind] = cand
            scores.append(score)
            if score >= settings.target_score:
                break
    call(P.render("extraction", candidates=best["treatment"] + "\n" + best["medicine"]))
    return sent


def run_ablation(encoder: str, decoder: str, scores=(3, 5, 9, 2, 4, 1), **overrides):
    backend = CountingBackend(scores)
    arena = make_arena(backend, max_decode_rounds=1, max_tries=3, symptom_encoder=encoder, symptom_decoder=decoder,
                       **overrides)
    record = run_one(arena, PATIENT)
    replay = CountingBackend(scores)

    def replay_reply(msgs):  # the backend's reply rule and call counter
        replay.seen.append(msgs)
        return replay.reply_for(msgs)

    expected = expected_sequence(PATIENT, arena.settings, replay_reply, encoder == "on", decoder == "on")
    return backend, arena, record, expected


def assert_same_calls(backend, record, expected):
    assert len(backend.seen) == len(expected) == record["calls"]
    for i, (got, want) in enumerate(zip(backend.seen, expected)):
        assert got == want, f"call {i} ({record['transcript'][i]['step']}) differs"


DIALOGUE = ["opening.patient"] + [f"dialogue.{r}.{who}" for r in range(1, 5) for who in ("doctor", "patient")]
AFTER_DECODER = (["diagnosis.1", "diagnosis.2", "diagnosis.review", "diagnosis.final"]
                 + [f"treatment.{n}.{w}" for n in (1, 2, 3) for w in ("doctor", "patient", "score")]
                 + [f"medicine.{n}.{w}" for n in (1, 2, 3) for w in ("doctor", "patient", "score")] + ["extraction"])


def decoder_steps(round_: int, principles: bool) -> list[str]:
    items = ["intermediate_belief", "intermediate_belief_depression", "coping_strategies", "situation"]
    return ([f"decode.{round_}.{k}" for k in items + (["principles"] if principles else [])]
            + [f"decode.{round_}.feedback"] + ([f"decode.{round_}.principle_feedback"] if principles else []))


# ---------------------------------------------------------------- the golden sequences
def test_without_symptom_encoder_the_patient_is_neutral_and_no_principles_are_chosen():
    backend, arena, record, expected = run_ablation("off", "on")
    assert_same_calls(backend, record, expected)
    steps = [t["step"] for t in record["transcript"]]
    assert steps == (DIALOGUE + decoder_steps(0, False) + ["decode.1.doctor", "decode.1.patient"]
                     + decoder_steps(1, False) + AFTER_DECODER)
    neutral = P.render("patient_neutral", **am.profile_slots(PATIENT))
    assert record["personas"] == {"patient_neutral": neutral}
    # what is left: the name, this week's situation and the emotions, nothing of the cognitive model
    assert PATIENT["name"] in neutral and PATIENT["situation"] in neutral
    assert all(e in neutral for e in PATIENT["emotion"])
    header = P.template("principles_header").split("{")[0].strip()
    groups = load_principles(DEFAULT_PRINCIPLES_FILE)
    for conv, entry in zip(backend.seen, record["transcript"]):
        if entry["speaker"] != "patient":
            continue
        text = "\n".join(m["content"] for m in conv)
        assert not any(PATIENT[f] in text for f in COGNITIVE_FIELDS), entry["step"]
        assert header not in text and "Cognitive Conceptualization Diagram" not in text, entry["step"]
        assert not any(p in text for g in groups.values() for p in g), entry["step"]
    # every patient turn used the neutral template, stored once per record
    patient_turns = [t for t in record["transcript"] if t["template"] == "patient_neutral"]
    assert len(patient_turns) == 6 and all(t["prompt"] is None for t in patient_turns)
    assert not any(t["template"] in am.ENCODER_PROMPTS for t in record["transcript"])
    # the decoder still compares with the profile's four items, without a principles item
    assert record["principles"] is None
    assert [sorted(r["similarities"]) for r in record["decoder"]] == [sorted(am.DECODER_ITEMS)] * 2
    assert record["feedback_rounds"] == 1 and record["decoder"][0]["feedback"] == FEEDBACK
    # the SFT input is the whole profile, as in a full run
    assert record["symptom"] == P.render("symptom", **am.profile_slots(PATIENT))
    assert record["settings"]["symptom_encoder"] == "off" and record["settings"]["symptom_decoder"] == "on"
    assert record["calls"] == am.expected_calls(arena.settings)  # every round and try used


def test_without_symptom_decoder_the_dialogue_goes_straight_to_the_diagnoses():
    backend, arena, record, expected = run_ablation("on", "off")
    assert_same_calls(backend, record, expected)
    steps = [t["step"] for t in record["transcript"]]
    assert steps == ["principles.choice"] + DIALOGUE + AFTER_DECODER
    assert not any(s.startswith("decode.") for s in steps)
    assert record["decoder"] == [] and record["feedback_rounds"] == 0
    assert not any(t["template"] in am.DECODER_PROMPTS for t in record["transcript"])
    # the encoder is whole: principles chosen and in every dialogue persona
    assert record["principles"]["chosen_group"] == list(arena.groups)[1]
    assert set(record["personas"]) == {"patient_cbt", "patient_imagine"}
    assert P.template("principles_header").split("{")[0].strip() in record["personas"]["patient_cbt"]
    assert record["settings"]["symptom_encoder"] == "on" and record["settings"]["symptom_decoder"] == "off"
    assert (record["treatment"], record["medicine"]) == ("CBT", "sertraline")


def test_both_ablations_together():
    backend, arena, record, expected = run_ablation("off", "off")
    assert_same_calls(backend, record, expected)
    assert [t["step"] for t in record["transcript"]] == DIALOGUE + AFTER_DECODER
    # nothing of the cognitive model or the principles reaches any model call except the judge's extraction
    text = "\n".join(m["content"] for conv in backend.seen for m in conv)
    assert not any(PATIENT[f] in text for f in COGNITIVE_FIELDS)
    assert record["principles"] is None and record["decoder"] == [] and record["feedback_rounds"] == 0


def test_the_same_sequence_with_both_components_on():
    """The rebuilt sequence without ablation: both feedback prompts (cognitive model, principles), exactly."""
    backend, arena, record, expected = run_ablation("on", "on")
    assert_same_calls(backend, record, expected)
    steps = [t["step"] for t in record["transcript"]]
    assert steps[1:len(DIALOGUE) + 1] == DIALOGUE and steps[0] == "principles.choice"
    assert steps.count("decode.0.principle_feedback") == steps.count("decode.1.principle_feedback") == 1


@pytest.mark.parametrize("encoder", ["on", "off"])
@pytest.mark.parametrize("decoder", ["on", "off"])
def test_the_first_estimate_is_still_the_most_calls(encoder, decoder):
    """Every score unreadable: every decoder round and every try; the estimate is exactly that."""
    backend = CountingBackend([0] * 20)
    arena = make_arena(backend, max_tries=3, max_decode_rounds=2, dialogue_rounds=2, symptom_encoder=encoder,
                       symptom_decoder=decoder)
    assert run_one(arena, PATIENT)["calls"] == am.expected_calls(arena.settings)


def test_roles_mode_without_encoder_puts_the_neutral_persona_in_the_system_message():
    backend = CountingBackend([9] * 4)
    record = run_one(make_arena(backend, history_mode="roles", max_decode_rounds=0, max_tries=1,
                                symptom_encoder="off"), PATIENT)
    opening = backend.seen[[t["step"] for t in record["transcript"]].index("opening.patient")]
    assert opening[0] == {"role": "system", "content": record["personas"]["patient_neutral"]}


# ---------------------------------------------------------------- settings, hash, templates
def test_settings_hash_separates_every_ablation_and_keeps_full_runs_hash():
    import hashlib
    from dataclasses import asdict
    base = dict(base_model="m", judge_model="m", encoder="e", similarity_threshold=0.3)
    digests = {(e, d): am.Settings(**base, symptom_encoder=e, symptom_decoder=d).digest()
               for e in ("on", "off") for d in ("on", "off")}
    assert len(set(digests.values())) == 4
    # a full run hashes as before the flags existed, so its older outputs still resume
    values = asdict(am.Settings(**base))
    del values["symptom_encoder"], values["symptom_decoder"]
    del values["base_fingerprint"], values["judge_fingerprint"]  # empty (no local model folder): left out too
    del values["emotion_format"]  # at its default ("joined"): left out, as before it existed
    assert digests["on", "on"] == hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def test_settings_hash_keeps_older_outputs_under_the_reference_score_parser():
    """Pinned: the hash these settings had before --score_parser existed (records then were scored by
    the first integer). "reference" keeps it, so such an output resumes under --score_parser reference;
    the default "robust" reads scores differently and so never resumes it."""
    base = dict(base_model="m", judge_model="m", encoder="e", similarity_threshold=0.3)
    assert am.Settings(**base, score_parser="reference").digest() == "142a687822aec903"
    assert am.Settings(**base).digest() != "142a687822aec903"


def test_a_local_model_retrained_in_place_changes_the_settings_hash():
    base = dict(base_model="runs/iter1/model/merged", judge_model="m", encoder="e", similarity_threshold=0.3)
    before, after = (am.Settings(**base, base_fingerprint=f).digest() for f in ("0b8edf8b2a9c8b8f", "3c1f00aa12de45b0"))
    assert before != after != am.Settings(**base).digest()


def test_templates_read_are_those_the_run_uses(tmp_path):
    """Both off: the dry run (every template a session renders) works from a folder without the
    encoder's and the decoder's templates; the neutral persona is read only by an encoder-off run."""
    folder = tmp_path / "p"
    shutil.copytree(PROMPT_DIR, folder)
    for name in set(am.ENCODER_PROMPTS + am.DECODER_PROMPTS):
        (folder / f"{name}.txt").unlink()
    prompts = Prompts(folder)
    names = am.prompt_names("name", "robust", "off", "off")
    prompts.check(names)
    settings = am.Settings(base_model="m", judge_model="m", encoder="e", similarity_threshold=0.3,
                           symptom_encoder="off", symptom_decoder="off")
    am.dry_run(settings, prompts, load_principles(DEFAULT_PRINCIPLES_FILE), PATIENT)
    assert "patient_neutral" not in am.prompt_names("name")
    assert am.prompt_names("name", "robust", "on", "on") == am.PROMPT_NAMES + ["final_illness", "extraction"]
    on_off = am.prompt_names("name", "robust", "on", "off")
    assert "patient_cbt" in on_off and "decode_principles" not in on_off and "doctor_feedback" not in on_off


def test_summary_with_decoder_off_says_so(tmp_path, capsys):
    patients = load_patients(DEFAULT_PATIENTS_FILE)[:2]
    arena = make_arena(CountingBackend([9] * 20), max_tries=1, symptom_decoder="off")
    out, errors = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    arena.base.gate.active = 0
    counts = asyncio.run(am.run_all(arena, [(p, 0) for p in patients], out, errors, 2))
    summary = am._summary(counts, 0, arena, 1.0, out, errors)
    assert summary["sessions_ok"] == 2 and summary["decoder"] == {"symptom_decoder": "off"}
    assert "[arena] decoder: off (--symptom_decoder off): no decoder questions, no feedback rounds" in capsys.readouterr().out


# ---------------------------------------------------------------- the command line
def _no_model(*args, **kwargs):
    raise AssertionError("a backend was built before the flags were checked")


@pytest.mark.parametrize(("flag", "value"), [("symptom_encoder", "none"), ("symptom_decoder", "False"),
                                             ("symptom_encoder", "1")])
def test_bad_ablation_value_is_one_line_exit_2(tmp_path, capsys, monkeypatch, flag, value):
    import mentalarena.engines.backends as backends
    monkeypatch.setattr(backends, "make_backend", _no_model)
    monkeypatch.setattr(am, "Encoder", _no_model)
    output = tmp_path / "run" / "out.jsonl"
    code = am.main(["--output_file", str(output), f"--{flag}", value, "--progress", "False"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"error: --{flag} must be one of on, off, not "), lines
    assert not output.parent.exists()


def test_a_broken_neutral_persona_is_refused_before_anything_loads(tmp_path, capsys, monkeypatch):
    import mentalarena.engines.backends as backends
    monkeypatch.setattr(backends, "make_backend", _no_model)
    monkeypatch.setattr(am, "Encoder", _no_model)
    folder = tmp_path / "p"
    shutil.copytree(PROMPT_DIR, folder)
    (folder / "patient_neutral.txt").write_text("You are {name}, feeling {mood}.\n")
    code = am.main(["--output_file", str(tmp_path / "out.jsonl"), "--prompt_dir", str(folder),
                    "--symptom_encoder", "off", "--progress", "False"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and "patient_neutral.txt" in lines[0] and "{mood}" in lines[0], lines


def _reply(request: dict) -> str:
    text = [m["content"] for m in request["messages"] if m["role"] == "user"][-1]
    if "extract the treatment" in text:
        return "Treatment: CBT\nExplanation: it helps\nMedicine: sertraline\nExplanation: an SSRI"
    return "7"


def test_an_ablation_run_records_its_flags_and_never_resumes_into_a_full_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ablation, full = tmp_path / "ablation.jsonl", tmp_path / "full.jsonl"
    with FakeOpenAI(responder=_reply) as server:
        args = ["--base_model", "fake-model", "--api_base", server.base_url, "--limit", "1", "--max_tries", "1",
                "--dialogue_rounds", "1", "--progress", "false"]
        off = ["--symptom_encoder", "off", "--symptom_decoder", "off"]
        assert am.main(args + off + ["--output_file", str(ablation)]) == 0
        out = capsys.readouterr().out
        assert "[arena] decoder: off (--symptom_decoder off)" in out
        (row,) = [json.loads(line) for line in ablation.read_text().splitlines()]
        assert (row["settings"]["symptom_encoder"], row["settings"]["symptom_decoder"]) == ("off", "off")
        assert row["decoder"] == [] and row["principles"] is None and row["calls"] == 1 + 2 + 4 + 2 * 3 + 1
        summary = json.loads(ablation.with_name("ablation.summary.json").read_text())
        assert summary["decoder"] == {"symptom_decoder": "off"}
        # the same output without the flags (a full run) is refused, and the other way round
        before, requests = ablation.read_bytes(), len(server.requests)
        assert am.main(args + ["--output_file", str(ablation)]) == 2
        assert "made with other settings" in capsys.readouterr().err
        assert am.main(args + ["--max_decode_rounds", "0", "--output_file", str(full)]) == 0
        capsys.readouterr()
        assert am.main(args + ["--max_decode_rounds", "0", "--symptom_decoder", "off", "--output_file", str(full)]) == 2
        assert "made with other settings" in capsys.readouterr().err
        assert ablation.read_bytes() == before
        # rerunning the ablation resumes it: nothing to do
        requests = len(server.requests)
        assert am.main(args + off + ["--output_file", str(ablation)]) == 0
        assert len(server.requests) == requests


def test_iterate_passes_the_ablation_flags_to_self_play(tmp_path, monkeypatch):
    import iterate
    from test_iterate import QUICK, Stages
    fake = Stages()
    monkeypatch.setattr(iterate, "run_stage", fake)
    code = iterate.main(["--work_dir", str(tmp_path / "w"), "--iterations", "1", "--eval", "none", *QUICK,
                         "--arena_args", '{"symptom_encoder": "off", "symptom_decoder": "off"}'])
    assert code == 0
    (arena,) = fake.of("arena_med.py")  # Stages binds the arguments to arena_med.run's signature
    assert (arena["symptom_encoder"], arena["symptom_decoder"]) == ("off", "off")


def test_fresh_calls_without_encoder_use_the_neutral_persona_as_system():
    backend = ScriptedBackend(rules=[("Rate this health state", "9")], default="text")
    record = run_one(make_arena(backend, max_decode_rounds=0, max_tries=1, symptom_encoder="off"), PATIENT)
    steps = [t["step"] for t in record["transcript"]]
    for step in ("diagnosis.review", "treatment.1.patient", "treatment.1.score"):
        conv = backend.seen[steps.index(step)]
        assert conv[0] == {"role": "system", "content": record["personas"]["patient_neutral"]}, step
