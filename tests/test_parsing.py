"""Parsers of the judge's replies, fed with the kinds of text real models produce."""
import pytest

from mentalarena.selfplay.parsing import (
    EXTRACTION_KEYS,
    first_integer,
    parse_extraction,
    parse_extraction_reference,
    parse_group_number,
    parse_score,
    parse_score_reference,
    skip_scale,
)


@pytest.mark.parametrize("text, expected", [
    ("abc 12 and 3", 12),
    ("7.5", 7),
    ("-4", 4),
    ("no digits", None),
    ("", None),
])
def test_first_integer(text, expected):
    assert first_integer(text) == expected


@pytest.mark.parametrize("text, n_groups, expected", [
    ("3", 5, 3),
    ("Group 2", 5, 2),
    ("**Group 4**: Speak plainly and reveal things slowly.", 5, 4),
    ("The most appropriate group is group 5.", 5, 5),
    ("2.", 5, 2),
    ("I would pick 3 because the patient avoids conflict.", 5, 3),
    ("\n\n  1\n", 5, 1),
    ("Group 10", 5, None),  # out of range: skipped, nothing else to find
    ("Group 10 is close, but group 3 fits best.", 5, 3),  # skipped, search goes on
    ("Group 0 is not an option; Group 2.", 5, 2),
    ("none", 5, None),
    ("", 5, None),
    ("Group two", 5, None),  # number words are not read
    ("1-5", 5, 1),
    ("Groups 1-5 all fit a little, but I choose 4.", 5, 1),  # first valid integer wins, by design
    ("Group 6", 6, 6),
    ("Group 3", 2, None),
    ("Option #4 (group 4)", 5, 4),
    ("Answer: 05", 5, 5),
])
def test_parse_group_number(text, n_groups, expected):
    assert parse_group_number(text, n_groups) == expected


# (text, parse_score, parse_score_reference): the health rating the judge gives after
# "Rate this health state from 1 to 10, ... Reply with the number only." 0 is "no score".
@pytest.mark.parametrize("text, robust, reference", [
    ("8", 8, 8),
    (" 9\n", 9, 9),
    ("1", 1, 1),
    ("10", 10, 10),
    ("Score: 7/10", 7, 7),
    ("7/10", 7, 7),
    ("10/10", 10, 10),
    ("7.5", 7, 7),
    ("3.9", 3, 3),  # decimals cut, as before
    ("I'd say 6 out of 10", 6, 6),
    ("I'd rate it 8 out of 10", 8, 8),
    ("Rating: 6.", 6, 6),
    ("**8**", 8, 8),
    ("__7__", 7, 7),
    ("My health state: 3. Still not great.", 3, 3),
    ("I would rate my health state as a 7 out of 10.", 7, 7),
    ("Health rating: **6**/10 - the sleep is better but the worry stays.", 6, 6),
    ("ten", 0, 0),
    ("", 0, 0),
    ("N/A", 0, 0),
    ("010", 10, 10),
    ("+5", 5, 5),
    # a stated scale is skipped; the reference reads its first number
    ("On a scale of 1 to 10, I would rate it 7.", 7, 1),
    ("On a scale of 1 to 10, the patient is at a 7", 7, 1),
    ("From 1 to 10, where 1 is bad and 10 is good, I'd say 6.", 6, 1),
    ("Rating (1-10): 8", 8, 1),
    ("On a 1-10 scale: 5", 5, 1),
    ("7 (1 = worst, 10 = best)", 7, 7),
    # off the 1-10 scale: unscored, never a top score; the reference ends the search on them
    ("32", 0, 32),
    ("121", 0, 121),
    ("32 %", 0, 32),
    ("90%", 0, 90),
    ("Score: 12", 0, 12),
    ("0", 0, 0),
    ("11", 0, 11),
    ("10.5", 0, 10),
    ("4/5", 0, 4),  # another scale: no rating on 1-10
    ("-2", 0, -2),  # int() keeps the sign; a negative rating is off the scale
    ("1_0", 0, 10),  # int() accepts digit-group underscores; no number a person writes
    # the first number left is the rating, even where a person would read a later one
    ("My health improved from 4 to 7.", 4, 4),
])
def test_parse_score(text, robust, reference):
    assert parse_score(text) == robust
    assert parse_score_reference(text) == reference


@pytest.mark.parametrize("text, left", [
    ("Empathy (1-10): 8", "Empathy  : 8"),
    ("Safety [0 - 10]: 5", "Safety  : 5"),
    ("Clarity (out of 10): 7", "Clarity  : 7"),
    ("Empathy (1 = poor, 10 = excellent): 6", "Empathy  : 6"),
    ("on a scale of 1 to 10, 7", " , 7"),
    ("rate it 8/10", "rate it 8 "),
    ("Non-judgement and respect (9)", "Non-judgement and respect (9)"),  # a score in brackets stays
    ("improved from 4 to 7", "improved from 4 to 7"),  # a change, not a scale
    ("6-7", "6-7"),
])
def test_skip_scale_blanks_only_stated_scales(text, left):
    assert skip_scale(text) == left


def ex(treatment="", explain_t="", medicine="", explain_m=""):
    return {"treatment": treatment, "explain_t": explain_t, "medicine": medicine, "explain_m": explain_m}


CLEAN = ex("CBT", "Targets negative thoughts.", "Sertraline", "An SSRI that lifts mood.")

# (judge output, parse_extraction, parse_extraction_reference)
EXTRACTION_CASES = [
    # the reference's own block has "Explanation" without a colon; judges copy it both ways
    pytest.param(
        "Treatment: CBT\nExplanation\nTargets negative thoughts.\nMedicine: Sertraline\nExplanation\n"
        "An SSRI that lifts mood.",
        CLEAN, ex("CBT", "", "Sertraline", ""), id="bare-explanation-next-line"),
    pytest.param(
        "Treatment: CBT\nExplanation Targets negative thoughts.\nMedicine: Sertraline\n"
        "Explanation An SSRI that lifts mood.",
        CLEAN, ex("CBT", "", "Sertraline", ""), id="bare-explanation-same-line"),
    pytest.param(
        "Treatment: CBT\nExplanation: Targets negative thoughts.\nMedicine: Sertraline\n"
        "Explanation: An SSRI that lifts mood.",
        CLEAN, CLEAN, id="clean"),
    pytest.param(
        "Sure, here is the extracted information:\n\nTreatment: CBT\nExplanation: Targets negative thoughts."
        "\nMedicine: Sertraline\nExplanation: An SSRI that lifts mood.\n\nLet me know if you need more.",
        CLEAN, CLEAN, id="commentary-around-block"),
    pytest.param(
        "**Treatment:** CBT\n**Explanation:** Targets negative thoughts.\n\n**Medicine:** Sertraline\n"
        "**Explanation:** An SSRI that lifts mood.",
        CLEAN,
        ex(":** CBT", ":** Targets negative thoughts.", ":** Sertraline", ":** An SSRI that lifts mood."),
        id="markdown-bold"),
    pytest.param(
        "- Treatment: CBT\n- Explanation: Targets negative thoughts.\n- Medicine: Sertraline\n"
        "- Explanation: An SSRI that lifts mood.",
        CLEAN,
        ex(": CBT", ": Targets negative thoughts.", ": Sertraline", ": An SSRI that lifts mood."),
        id="dash-list"),
    pytest.param(
        "1. Treatment: CBT\n2. Explanation: Targets negative thoughts.\n3. Medicine: Sertraline\n"
        "4. Explanation: An SSRI that lifts mood.",
        CLEAN,
        ex("t: CBT", "n: Targets negative thoughts.", "e: Sertraline", "n: An SSRI that lifts mood."),
        id="numbered-list"),
    pytest.param(
        "TREATMENT: CBT\nEXPLANATION: Targets negative thoughts.\nMEDICINE: Sertraline\n"
        "EXPLANATION: An SSRI that lifts mood.",
        CLEAN, ex(), id="upper-case"),
    pytest.param(
        "Treatment: CBT\nExplanation: Targets negative thoughts.\nMedication: Sertraline\n"
        "Explanation: An SSRI that lifts mood.",
        CLEAN, ex("CBT", "Targets negative thoughts.", "", "An SSRI that lifts mood."),
        id="medication-synonym"),
    pytest.param(
        "Treatment: CBT\nExplanation\nTargets negative thoughts.\nMedicine: Sertraline\nExplanation\n"
        "An SSRI that lifts mood.",
        CLEAN, ex("CBT", "", "Sertraline", ""), id="explanation-without-colon"),
    pytest.param(
        "Treatment:\n\nCBT\nExplanation:\n\nTargets negative thoughts.\nMedicine:\nSertraline\n"
        "Explanation:\nAn SSRI that lifts mood.",
        CLEAN,
        # reference: the blank next line gives an empty first explanation, so the second one
        # lands in explain_t
        ex("", "An SSRI that lifts mood.", "Sertraline", ""), id="value-after-blank-line"),
    pytest.param(
        "Treatment: CBT Explanation: Targets negative thoughts.\n"
        "Medicine: Sertraline Explanation: An SSRI that lifts mood.",
        CLEAN,
        ex("CBT Explanation: Targets negative thoughts.", "", "Sertraline Explanation: An SSRI that lifts mood.", ""),
        id="inline-labels"),
    pytest.param(
        "Treatment: CBT\nMedicine: Sertraline\nExplanation: An SSRI that lifts mood.",
        ex("CBT", "", "Sertraline", "An SSRI that lifts mood."),
        ex("CBT", "An SSRI that lifts mood.", "Sertraline", ""),
        id="missing-treatment-explanation"),
    pytest.param(
        "Treatment: CBT\nExplanation: Targets negative thoughts.\nMedicine: None\n"
        "Explanation: No medicine was proposed.",
        ex("CBT", "Targets negative thoughts.", "None", "No medicine was proposed."),
        ex("CBT", "Targets negative thoughts.", "None", "No medicine was proposed."),
        id="medicine-none"),
    pytest.param(
        "### Treatment\nCBT\n### Explanation\nTargets negative thoughts.\n### Medicine\nSertraline\n"
        "### Explanation\nAn SSRI that lifts mood.",
        CLEAN, ex(), id="markdown-headings"),
    pytest.param(
        "Treatment plan: CBT\nExplanation for the treatment: Targets negative thoughts.\n"
        "Recommended medication: Sertraline\nExplanation of the medicine: An SSRI that lifts mood.",
        CLEAN, ex(), id="longer-headers"),
    pytest.param(
        "Treatment: CBT\nExplanation: The best medicine: patience.\nMedicine: Sertraline\n"
        "Explanation: An SSRI that lifts mood.",
        ex("CBT", "The best medicine: patience.", "Sertraline", "An SSRI that lifts mood."),
        ex("CBT", "The best medicine: patience.", "Sertraline", "An SSRI that lifts mood."),
        id="lowercase-label-word-inside-value"),
    pytest.param(
        "Treatment: CBT\nExplanation: first.\nExplanation: second.\nExplanation: third.",
        ex("CBT", "first."), ex("CBT", "first.", "", "third."), id="repeated-explanations"),
    pytest.param(
        "Treatment: CBT\nTreatment: Exposure therapy",
        ex("CBT"), ex("Exposure therapy"), id="repeated-label-first-vs-last"),
    pytest.param(
        "Treatment: CBT\nExplanation:",
        ex("CBT"), ex("CBT"), id="label-on-last-line"),
    pytest.param(
        "Explanation: Targets negative thoughts.\nExplanation: An SSRI that lifts mood.",
        ex("", "Targets negative thoughts.", "", "An SSRI that lifts mood."),
        ex("", "Targets negative thoughts.", "", "An SSRI that lifts mood."),
        id="explanations-only-keep-order"),
    pytest.param(
        "Treatment - CBT\n*Explanation:* Targets negative thoughts.\nMedicine – Sertraline\n"
        "> Explanation: An SSRI that lifts mood.",
        CLEAN,
        ex("", "* Targets negative thoughts.", "", ": An SSRI that lifts mood."),
        id="dash-separator-italics-quote"),
    pytest.param(
        "Medicine: Sertraline\nExplanation: An SSRI that lifts mood.\nTreatment: CBT\n"
        "Explanation: Targets negative thoughts.",
        CLEAN,
        ex("CBT", "An SSRI that lifts mood.", "Sertraline", "Targets negative thoughts."),
        id="medicine-block-first"),
    pytest.param("", ex(), ex(), id="empty"),
    pytest.param("I cannot extract anything from this.", ex(), ex(), id="no-labels"),
]


@pytest.mark.parametrize("text, robust, reference", EXTRACTION_CASES)
def test_parse_extraction(text, robust, reference):
    assert parse_extraction(text) == robust
    assert parse_extraction_reference(text) == reference


@pytest.mark.parametrize("parser", [parse_extraction, parse_extraction_reference])
def test_extraction_always_returns_the_four_string_keys(parser):
    for case in EXTRACTION_CASES:
        result = parser(case.values[0])
        assert tuple(result) == EXTRACTION_KEYS
        assert all(isinstance(v, str) for v in result.values())


def test_reference_short_label_on_last_line_keeps_earlier_value():
    # Reference quirk: a bare "Treatment:" as the last line leaves the earlier value in place,
    # while a bare "Explanation:" there still writes an empty explanation into explain_m.
    text = "Treatment: CBT\nExplanation: a\nExplanation: b\nTreatment:"
    assert parse_extraction_reference(text) == ex("CBT", "a", "", "b")
    assert parse_extraction_reference("Explanation: a\nExplanation: b\nExplanation:") == ex("", "a", "", "")
