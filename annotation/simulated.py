"""Simulated annotators: FOR DEMOS AND TESTS ONLY, never for a real curation.

A simulated annotator is a real Label Studio user (signed up through the invite link, with its own API
token) that works through a round's labeling stream exactly as the UI does (``/next`` then submit), but
answers by a fixed rule instead of judgement: from a score column of the pool, or from a deterministic
hash of its name and the pool id. It lets the flows run end to end, and tests check what the system makes
of two annotators who agree, disagree, skip or fail gold.

Such users join the organisation, so they are created only in dev mode (NEEDLES_DEV=1, set by the local
stack and the tests), and ``simulate_round`` gives each a fresh address and a random password per call
(never printed, never stored): nobody can log in as a simulated annotator later.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

from annotation.client import POOL_ID_KEY, LabelStudioClient, require_dev_mode
from annotation.curation import round_projects
from annotation.rounds import Round

#: task data -> {question: value}, or None to skip the task
Rule = Callable[[dict[str, Any]], "dict[str, Any] | None"]


def _unit(*parts: str) -> float:
    """A deterministic number in [0, 1) from the parts."""
    return int(hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:8], 16) / 2**32


def full_answers(round_: Round, positive: bool, data: dict[str, Any], quality: float) -> dict[str, Any]:
    """Answers to every question of the round, consistent with one keep/reject and a 0-1 quality."""
    decision_choices = round_.controls[round_.decision_field].choices
    negative = next(c for c in decision_choices if c != round_.positive_value)
    answers: dict[str, Any] = {round_.decision_field: round_.positive_value if positive else negative}
    for control in round_.controls.values():
        if control.name in answers:
            continue
        if control.tag == "Rating":
            answers[control.name] = 1 + round(quality * ((control.max_rating or 5) - 1))
        elif control.tag == "Choices":
            # yes/no questions of the specialist round: "could it be better" is the one where yes is bad
            good = "no" if control.name == "could_be_better" else "yes"
            answers[control.name] = good if positive else next(c for c in control.choices if c != good)
        elif control.tag == "TextArea" and positive and control.name == round_.caption_field:
            answers[control.name] = f"{data.get('caption') or 'A photograph'} (simulated caption)"
    return answers


def hash_rule(round_: Round, annotator: str, keep_fraction: float) -> Rule:
    """Keeps a deterministic ``keep_fraction`` of the images, chosen by hashing annotator and pool id."""

    def rule(data: dict[str, Any]) -> dict[str, Any]:
        u = _unit(annotator, data[POOL_ID_KEY])
        return full_answers(round_, u < keep_fraction, data, quality=1 - u)

    return rule


def scripted_user(admin: LabelStudioClient, email: str, password: str) -> LabelStudioClient:
    """A client acting as the scripted user ``email`` (signed up on first use); dev mode only. The caller
    closes it."""
    require_dev_mode(f"creating the simulated annotator {email!r}")
    return admin.as_user(admin.ensure_annotator(email, password))


def one_time_password() -> str:
    """A random password for a scripted user of one run (Python's secrets module)."""
    return secrets.token_urlsafe(24)


def run_tag() -> str:
    """A short random tag that makes one run's scripted users new users (their passwords differ per run)."""
    return secrets.token_hex(3)


@dataclass
class SimulatedAnnotator:
    email: str
    password: str = field(repr=False)
    rule: Rule
    lead_time_s: float = 3.0  # recorded as the annotation's lead time

    def annotate(
        self, admin: LabelStudioClient, round_: Round, campaign: str, limit: int | None = None
    ) -> int:
        """Answer open tasks of the round (at most ``limit``) as this user; returns how many."""
        done = 0
        with scripted_user(admin, self.email, self.password) as me:
            for project_id in round_projects(admin, campaign, round_).values():
                while limit is None or done < limit:
                    task = me.next_task(project_id)
                    if task is None:
                        break
                    answers = self.rule(task["data"])
                    if answers is None:
                        me.submit_annotation(task["id"], [], self.lead_time_s, skipped=True)
                    else:
                        me.submit_annotation(task["id"], round_.result_from_answers(answers), self.lead_time_s)
                    done += 1
        return done


def simulate_round(admin: LabelStudioClient, round_: Round, campaign: str, annotators: int,
                   keep_fraction: float) -> dict[str, int]:
    """DEV MODE ONLY (NEEDLES_DEV=1): ``annotators`` new scripted users (simulated-N-<random tag>@needles.local,
    random passwords) answer every open task of the round by ``hash_rule`` (keyed on simulated-N@needles.local,
    so their answers do not depend on the tag); returns how many tasks each answered."""
    require_dev_mode("annotator_mode=simulated (scripted annotators)")
    tag = run_tag()
    done = {}
    for i in range(annotators):
        name = f"simulated-{i + 1}"
        email = f"{name}-{tag}@needles.local"
        rule = hash_rule(round_, f"{name}@needles.local", keep_fraction)
        annotator = SimulatedAnnotator(email, one_time_password(), rule)
        done[email] = annotator.annotate(admin, round_, campaign)
    return done
