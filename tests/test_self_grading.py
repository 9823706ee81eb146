"""The self-grading that guides LatentSeek: verdict parsing and the weighted reward, exactly; each
grader's prompts decoded on a real GGUF model give a reward its verdicts account for."""
from __future__ import annotations

import json

import pytest

from selar_local import self_grading as sg
from selar_local.errors import InvalidParameterError
from selar_local.latentseek import REWARD_THRESHOLD, reward_passes
from selar_local.latentseek_search import grade

from conftest import runtime_for


def test_a_checks_verdict_is_the_last_true_or_false_in_its_reply():
    assert sg.verdict_of("12 * 3 = 36, correct.\nVERDICT: true")
    assert sg.verdict_of("VERDICT: **True**.") and sg.verdict_of("VERDICT: `true`")
    assert sg.verdict_of("All calculations match, so the verdict is \\(\\boxed{true}\\).")
    assert not sg.verdict_of("First I thought VERDICT: true, but 5 + 4 = 9, not 8.\nVERDICT: false")
    assert sg.verdict_of("VERDICT: false? No: VERDICT: TRUE")
    assert not sg.verdict_of("Everything is correct.")  # no verdict: the check failed
    assert not sg.verdict_of("VERDICT: maybe") and not sg.verdict_of("VERDICT: truely") and not sg.verdict_of("")


def test_the_checks_reward_is_minus_the_failed_weight_over_six():
    checks = sg.GRADERS["checks"]
    assert [p.split("TASK:")[0] == checks.prompts[0].split("TASK:")[0] for p in checks.prompts] == [True] * 4
    assert checks.weights == (2.0, 1.0, 2.0, 1.0) and checks.schema is None
    assert len(checks.starts) == 4 and all(start.strip() for start in checks.starts)
    assert sg.GRADERS["json"].starts == ("",)
    yes, no = "VERDICT: true", "VERDICT: false"
    assert checks.reward([yes] * 4) == 0.0
    assert checks.reward([yes, yes, yes, no]) == -1 / 6  # one check of weight 1 failed: passes
    assert checks.reward([yes, no, yes, no]) == -2 / 6
    assert checks.reward([no, yes, yes, yes]) == -2 / 6
    assert checks.reward([yes, no, no, yes]) == -3 / 6
    assert checks.reward(["", "", "", ""]) == -1.0
    assert REWARD_THRESHOLD == -0.2
    assert reward_passes(-1 / 6) and not reward_passes(-2 / 6) and reward_passes(0.0)
    with pytest.raises(InvalidParameterError, match="3 texts for 4 prompts"):
        checks.reward([yes] * 3)


def test_the_json_reward_counts_its_three_fields():
    grader = sg.GRADERS["json"]
    ok = {name: True for name in sg.JSON_FIELDS}
    assert grader.reward([json.dumps(ok)]) == 0.0
    assert grader.reward([json.dumps({**ok, "answer_consistent": False})]) == -1 / 3
    assert grader.reward([json.dumps({"reasoning_correct": True})]) == -2 / 3
    assert grader.reward([json.dumps({**ok, "answer_complete": "true"})]) == -1 / 3  # only JSON true is true
    assert grader.reward(["not json"]) == -1.0 and grader.reward(["[true]"]) == -1.0
    # at the default threshold only a clean pass passes, as when it was 0
    assert not reward_passes(-1 / 3)


def test_the_prompts_show_the_question_and_answer_and_unknown_graders_are_refused():
    for grader in sg.GRADERS.values():
        chats = grader.messages("  What is 2 + 3? ", "2 + 3 = 5.\n")
        assert len(chats) == len(grader.prompts)
        for chat in chats:
            assert [m["role"] for m in chat] == ["user"]
            assert "What is 2 + 3?\n" in chat[0]["content"] and "2 + 3 = 5.\n" in chat[0]["content"]
            assert "{question}" not in chat[0]["content"] and "{answer}" not in chat[0]["content"]
    with pytest.raises(InvalidParameterError, match="unknown LatentSeek grader 'vote'; known: checks, json"):
        sg.grader_named("vote")


@pytest.mark.parametrize("name", sorted(sg.GRADERS))
def test_each_grader_decodes_a_reward_its_verdicts_account_for(model_files, name):
    """On a real model: the grading decodes (free text, or the object the grammar allows), and
    the reward and token count are those of the texts decoded by hand with the same settings."""
    rt = runtime_for("llama", model_files)
    grader = sg.GRADERS[name]
    question, answer = "What is 2 + 3?", "2 + 3 = 5. The answer is 5."
    reward, tokens = grade(rt, question, answer, grader=name)
    params = rt.default_params(method="cot", greedy=True, max_tokens=grader.max_tokens, json_schema=grader.schema)
    starts = [rt.model.tokenize(start, add_special=False, parse_special=False) for start in grader.starts]
    texts = rt.generate_batch([rt.encode(messages=chat) + start
                               for chat, start in zip(grader.messages(question, answer), starts)],
                              [params] * len(grader.prompts))
    assert reward == grader.reward([t.content for t in texts]) and -1.0 <= reward <= 0.0
    assert tokens == sum(len(t.tokens) for t in texts) > 0
    if grader.schema is not None:
        verdict = json.loads(texts[0].content)
        assert set(verdict) == set(sg.JSON_FIELDS) and all(isinstance(v, bool) for v in verdict.values())


def test_the_reference_grader_is_zero_for_a_matching_answer_and_minus_one_otherwise():
    assert (sg.reference_reward(True), sg.reference_reward(False)) == (0.0, -1.0)
    assert sg.GRADER_NAMES == ("checks", "json", "psrm") and sg.REFERENCE_GRADER not in sg.GRADERS
    assert not reward_passes(sg.reference_reward(False), REWARD_THRESHOLD)
    assert reward_passes(sg.reference_reward(True), REWARD_THRESHOLD)
