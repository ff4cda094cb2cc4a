"""Every call to Label Studio, in one place (label-studio-sdk 2.x plus the two browser-only endpoints).

Faults are turned into three errors a caller can act on:

- ``LabelStudioUnavailable``: unreachable or restarting after retrying with exponential backoff;
- ``LabelStudioAuthError``: the token was rejected (wrong token, or a user without access);
- ``LabelStudioError``: anything else the server refused, with its answer (and ``LabelStudioConfigError``:
  the environment does not say how to reach the server).

Calls that create things (projects, task imports, annotations) are never blindly re-sent: after a
dropped connection the client looks at what the server already has before trying again, so a push that
fails half way and is re-run (or retried) creates no duplicate.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Self, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from pipeline.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses that mean "the server is (re)starting or overloaded": retried.
RETRY_STATUSES = {502, 503, 504}
#: task data key holding the pool id; the idempotency key of a push.
POOL_ID_KEY = "pool_id"



class LabelStudioError(UserError):
    """Label Studio refused a request; the message carries its answer."""


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio did not answer (or kept answering 5xx) for the whole retry budget."""


class LabelStudioAuthError(LabelStudioError):
    """Label Studio rejected the token (HTTP 401/403)."""


class LabelStudioConfigError(LabelStudioError):
    """The environment lacks what is needed (an API token), or asks for a demo-only feature outside dev mode."""


#: Set to 1 by the local development stack (``make up``/``make demo``) and the tests: it allows the built-in
#: development API token and the simulated annotators, which must never exist on a real server.
DEV_MODE_VAR = "NEEDLES_DEV"
#: annotation/labelstudio/start.sh's default admin token: used only in dev mode, when no token is set.
DEV_API_TOKEN = "needles-dev-token-0123456789abcdef"


def dev_mode() -> bool:
    """True when NEEDLES_DEV is set to 1 (or true/yes/on)."""
    return os.environ.get(DEV_MODE_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def require_dev_mode(what: str) -> None:
    """Raise ``LabelStudioConfigError`` naming NEEDLES_DEV unless dev mode is on."""
    if not dev_mode():
        raise LabelStudioConfigError(
            f"{what} is for demos and tests only: set {DEV_MODE_VAR}=1 to allow it (the local stack does)"
        )


@dataclass(frozen=True)
class LabelStudioSettings:
    """Where Label Studio is and how to reach its files.

    ``document_root`` is Label Studio's LOCAL_FILES_DOCUMENT_ROOT as seen from this process: images are
    written under it and served by Label Studio as ``/data/local-files/?d=<relative path>``, so this
    process and the server must share that folder (same machine, or a shared volume).
    """

    url: str
    api_key: str
    document_root: Path
    retry_budget_s: float = 60.0  # how long to keep retrying an unreachable server
    timeout_s: float = 300.0  # one request; imports of 10K tasks and exports of big projects are slow

    @classmethod
    def from_env(cls, **overrides: Any) -> LabelStudioSettings:
        """LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY (or the admin's LABEL_STUDIO_USER_TOKEN, as
        annotation/labelstudio/start.sh names it), LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT and
        LABEL_STUDIO_RETRY_BUDGET_S (seconds of retrying an unreachable server), with the defaults of
        start.sh. Without a token the development token is used only in dev mode (NEEDLES_DEV=1);
        otherwise ``LabelStudioConfigError`` names the variable to set."""
        api_key = overrides.get("api_key") or os.environ.get("LABEL_STUDIO_API_KEY") or os.environ.get(
            "LABEL_STUDIO_USER_TOKEN"
        )
        if not api_key:
            if not dev_mode():
                raise LabelStudioConfigError(
                    "LABEL_STUDIO_API_KEY is not set: set it to the Label Studio API token of the admin user "
                    f"(Account & Settings > Access Token), or {DEV_MODE_VAR}=1 for the local development stack"
                )
            log.info("no LABEL_STUDIO_API_KEY: dev mode (%s=1) uses the local stack's development token", DEV_MODE_VAR)
            api_key = DEV_API_TOKEN
        values: dict[str, Any] = {
            "url": os.environ.get("LABEL_STUDIO_URL", "http://127.0.0.1:8080"),
            "retry_budget_s": float(os.environ.get("LABEL_STUDIO_RETRY_BUDGET_S", cls.retry_budget_s)),
            "api_key": api_key,
            "document_root": Path(
                os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "data/labelstudio-files")
            ).resolve(),
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class ProjectCounts:
    """Label Studio's own counters for one project."""

    project_id: int
    tasks: int
    finished_tasks: int  # tasks with ``maximum_annotations`` (the round's overlap) annotations
    annotations: int
    skipped: int


@dataclass
class Backoff:
    budget_s: float
    first_s: float = 0.5
    max_s: float = 8.0
    started: float = field(default_factory=time.monotonic)
    tries: int = 0

    def sleep_or_give_up(self) -> bool:
        """Sleep before the next try; False when the budget is spent."""
        delay = min(self.first_s * 2**self.tries, self.max_s)
        if time.monotonic() - self.started + delay > self.budget_s:
            return False
        self.tries += 1
        time.sleep(delay)
        return True


def _is_transient(error: Exception) -> bool:
    if isinstance(error, httpx.TransportError):
        return True
    return isinstance(error, ApiError) and error.status_code in RETRY_STATUSES


class LabelStudioClient:
    """One Label Studio user (admin or annotator) talking to one server.

    It holds two connection pools (the SDK's and its own): use it as a context manager, or call
    ``close()``, so that no connection outlives the work (the relay makes one client per poll).
    """

    def __init__(self, settings: LabelStudioSettings) -> None:
        self.settings = settings
        self.url = settings.url.rstrip("/")
        # The SDK's connection pool is ours (passed in) so that close() can close it.
        self.sdk_http = httpx.Client(timeout=settings.timeout_s, follow_redirects=True)
        # Our own retry loop (below) handles 5xx and dropped connections with a time budget.
        self.sdk = LabelStudio(
            base_url=self.url, api_key=settings.api_key, timeout=settings.timeout_s, max_retries=0,
            httpx_client=self.sdk_http,
        )
        # For the endpoints the SDK does not wrap (the labeling stream's /next).
        self.http = httpx.Client(
            base_url=self.url,
            timeout=settings.timeout_s,
            headers={"Authorization": f"Token {settings.api_key}"},
        )

    def close(self) -> None:
        """Close both connection pools (idempotent)."""
        self.http.close()
        self.sdk_http.close()

    @property
    def closed(self) -> bool:
        return self.http.is_closed and self.sdk_http.is_closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def as_user(self, api_key: str) -> LabelStudioClient:
        """A client for another user of the same server (an annotator with their own token); the caller
        closes it (``with admin.as_user(token) as me: ...``)."""
        return LabelStudioClient(
            LabelStudioSettings(
                url=self.url,
                api_key=api_key,
                document_root=self.settings.document_root,
                retry_budget_s=self.settings.retry_budget_s,
                timeout_s=self.settings.timeout_s,
            )
        )

    # -- the retry wrapper every call goes through ----------------------------------------------------
    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        backoff = Backoff(self.settings.retry_budget_s)
        while True:
            try:
                return fn(*args, **kwargs)
            except (httpx.TransportError, ApiError) as error:
                self._raise_if_permanent(what, error)
                if not backoff.sleep_or_give_up():
                    raise LabelStudioUnavailable(
                        f"Label Studio at {self.url} did not answer while {what}: gave up after "
                        f"{backoff.tries + 1} tries in {time.monotonic() - backoff.started:.0f}s "
                        f"({type(error).__name__}: {error})"
                    ) from error
                log.warning("Label Studio unavailable while %s (%s); retrying", what, type(error).__name__)

    def _create_once(self, what: str, create: Callable[[], T], committed: Callable[[], T | None],
                     hint: str = "") -> T:
        """``create()`` under the retry budget, for a request that is not idempotent: after a dropped
        connection or a 5xx the server is asked (``committed()``) whether the request went through
        before it is sent again, so nothing is created twice."""
        backoff = Backoff(self.settings.retry_budget_s)
        while True:
            try:
                return create()
            except (httpx.TransportError, ApiError) as error:
                self._raise_if_permanent(what, error)
                if not backoff.sleep_or_give_up():
                    raise LabelStudioUnavailable(f"Label Studio at {self.url} did not answer while {what}{hint}") from error
                self.wait_until_up()
                done = committed()
                if done is not None:
                    return done

    def _raise_if_permanent(self, what: str, error: Exception) -> None:
        if _is_transient(error):
            return
        assert isinstance(error, ApiError)
        if error.status_code in (401, 403):
            raise LabelStudioAuthError(
                f"Label Studio at {self.url} rejected the API token while {what} (HTTP {error.status_code}); "
                "check LABEL_STUDIO_API_KEY"
            ) from error
        raise LabelStudioError(
            f"Label Studio at {self.url} refused {what}: HTTP {error.status_code} {error.body}"
        ) from error

    def _http(self, what: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        def send() -> httpx.Response:
            response = self.http.request(method, path, **kwargs)
            if response.status_code >= 400 and response.status_code != 404:
                raise ApiError(status_code=response.status_code, body=response.text[:500])
            return response

        return self._call(what, send)

    def wait_until_up(self) -> None:
        """Block until the server answers an authenticated request (or the retry budget is spent)."""
        self._call("checking the server", self.sdk.users.whoami)

    # -- users ----------------------------------------------------------------------------------------
    def whoami(self) -> Any:
        return self._call("reading the current user", self.sdk.users.whoami)

    def user_emails(self) -> dict[int, str]:
        users = self._call("listing users", self.sdk.users.list)
        return {u.id: u.email for u in users}

    def ensure_annotator(self, email: str, password: str) -> str:
        """The API token of annotator ``email``, signing them up through the organisation's invite link
        on first use (the way a person joins: Label Studio's API has no call that sets a password).
        """
        invite = self._call("reading the invite link", self.sdk.organizations.invites.get_invite_link)
        with httpx.Client(base_url=self.url, timeout=self.settings.timeout_s, follow_redirects=False) as browser:
            self._call("opening the login page", browser.get, "/user/login/")
            login = self._call(
                "logging in an annotator",
                browser.post,
                "/user/login/",
                data={"email": email, "password": password, "csrfmiddlewaretoken": browser.cookies.get("csrftoken")},
                headers={"Referer": f"{self.url}/user/login/"},
            )
            if login.status_code != 302:  # the form is shown again: no such user yet (or wrong password)
                self._call("opening the signup page", browser.get, "/user/signup/", params={"token": invite.token})
                signup = self._call(
                    "signing up an annotator",
                    browser.post,
                    f"/user/signup/?token={invite.token}",
                    data={
                        "email": email,
                        "password": password,
                        "csrfmiddlewaretoken": browser.cookies.get("csrftoken"),
                    },
                    headers={"Referer": f"{self.url}/user/signup/"},
                )
                if signup.status_code != 302:
                    raise LabelStudioError(
                        f"could not log in or sign up annotator {email!r} (an existing user with another "
                        f"password, or a password Label Studio finds too weak): HTTP {signup.status_code}"
                    )
            token = self._call("reading an annotator's token", browser.get, "/api/current-user/token")
            if token.status_code != 200:
                raise LabelStudioAuthError(f"no API token for annotator {email!r}: HTTP {token.status_code}")
            return token.json()["token"]

    # -- projects ---------------------------------------------------------------------------------------
    def projects_titled(self, prefix: str) -> dict[str, int]:
        """``{title: project id}`` of the projects whose title starts with ``prefix``."""
        projects = self._call("listing projects", lambda: list(self.sdk.projects.list(page_size=1000)))
        return {p.title: p.id for p in projects if p.title and p.title.startswith(prefix)}

    def ensure_project(
        self, title: str, label_config: str, instructions: str, overlap: int, description: str
    ) -> int:
        """The id of the project titled ``title``, created once (never twice, even across a retry)."""
        existing = self.projects_titled(title)
        if title in existing:
            return existing[title]

        def create() -> int:
            return self.sdk.projects.create(
                title=title,
                description=description,
                label_config=label_config,
                expert_instruction=instructions,
                show_instruction=True,
                show_skip_button=True,
                enable_empty_annotation=False,
                # every task gets `overlap` annotators: Label Studio's distribution of overlapping tasks
                maximum_annotations=overlap,
                overlap_cohort_percentage=100,
                sampling="Sequential sampling",
            ).id

        return self._create_once(f"creating project {title!r}", create, lambda: self.projects_titled(title).get(title))

    def ensure_local_storage(self, project_id: int, path: Path) -> None:
        """Connect ``path`` (under the document root) to the project so Label Studio serves its files.

        It is never synced: tasks are imported with their pool ids, the storage only grants access.
        """
        path.mkdir(parents=True, exist_ok=True)
        storages = self._call(
            "listing local storages", self.sdk.import_storage.local.list, project=project_id
        )
        if any(Path(s.path) == path for s in storages):
            return
        self._call(
            "connecting local storage",
            self.sdk.import_storage.local.create,
            project=project_id,
            path=str(path),
            title="needles images",
            use_blob_urls=True,
        )

    def project_counts(self, project_id: int) -> ProjectCounts:
        p = self._call("reading project counters", self.sdk.projects.get, project_id)
        return ProjectCounts(
            project_id=project_id,
            tasks=p.task_number or 0,
            finished_tasks=p.finished_task_number or 0,
            annotations=p.total_annotations_number or 0,
            skipped=p.skipped_annotations_number or 0,
        )

    # -- tasks --------------------------------------------------------------------------------------------
    def export_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """The project's tasks that have at least one annotation (skipped ones included), with their
        annotations (Label Studio's JSON export)."""

        def download() -> list[dict[str, Any]]:
            chunks = self.sdk.projects.exports.download_sync(
                project_id, export_type="JSON", download_all_tasks=False
            )
            return json.loads(b"".join(chunks))

        return self._call(f"exporting project {project_id}", download)

    def pool_ids(self, project_id: int) -> dict[str, int]:
        """``{pool id: task id}`` of the project's tasks."""
        if self.project_counts(project_id).tasks == 0:
            return {}

        def read() -> dict[str, int]:
            # Only id and data: about 0.6 ms a task on the server, against 1.4 ms for a full export.
            pages = self.sdk.tasks.list(project=project_id, fields="task_only", include="id,data", page_size=10_000)
            return {t.data[POOL_ID_KEY]: t.id for t in pages if t.data and POOL_ID_KEY in t.data}

        return self._call(f"listing the tasks of project {project_id}", read)

    def import_new_tasks(self, project_id: int, tasks: list[dict[str, Any]], known: set[str]) -> int:
        """Import the tasks whose pool id is not in ``known``; returns how many were created.

        An import whose connection drops may or may not have been committed, so after a failure the
        project's pool ids are read again and only the missing tasks are sent.
        """
        pending = [t for t in tasks if t["data"][POOL_ID_KEY] not in known]
        if not pending:
            return 0
        count = len(pending)

        def send() -> int:
            self.sdk.projects.import_tasks(project_id, request=pending, return_task_ids=False)
            return count

        def committed() -> int | None:
            nonlocal pending
            known.update(self.pool_ids(project_id))
            pending = [t for t in pending if t["data"][POOL_ID_KEY] not in known]
            return None if pending else count

        created = self._create_once(f"importing {count} tasks into project {project_id}", send, committed,
                                    "; re-run the push to complete it (nothing will be duplicated)")
        known.update(t["data"][POOL_ID_KEY] for t in tasks)
        return created

    # -- annotating (as an annotator) --------------------------------------------------------------------
    def next_task(self, project_id: int) -> dict[str, Any] | None:
        """The next task Label Studio's labeling stream gives this user (as the UI would), or None."""
        response = self._http("asking for the next task", "GET", f"/api/projects/{project_id}/next/")
        return None if response.status_code == 404 else response.json()

    def submit_annotation(
        self, task_id: int, result: list[dict[str, Any]], lead_time: float, skipped: bool = False
    ) -> int:
        """Submit this user's annotation of a task; after a dropped connection, the task is looked at
        first so that an annotation the server did receive is not submitted twice."""
        def create() -> int:
            return self.sdk.annotations.create(task_id, result=result, lead_time=lead_time, was_cancelled=skipped).id

        def committed() -> int | None:
            me = self.whoami().id
            mine = [a.id for a in self._call("listing a task's annotations", self.sdk.annotations.list, task_id)
                    if a.completed_by == me]
            return mine[0] if mine else None

        return self._create_once(f"submitting an annotation of task {task_id}", create, committed)

    # -- webhooks -----------------------------------------------------------------------------------------
    def create_webhook(self, project_id: int, url: str) -> int:
        """Ask Label Studio to call ``url`` at each annotation of the project. With SSRF protection on (as it
        should be) it refuses loopback and private addresses: the error then says so."""
        try:
            hook = self._call(
                f"registering a webhook to {url}",
                self.sdk.webhooks.create,
                url=url,
                project=project_id,
                send_payload=False,
                send_for_all_actions=False,
                actions=["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"],
            )
        except LabelStudioError as error:
            answer = error.__cause__
            # Label Studio answers a URL its SSRF checks refuse with 403; 401 is a token it does not know.
            if isinstance(error, LabelStudioUnavailable) or getattr(answer, "status_code", None) == 401:
                raise
            raise LabelStudioError(
                f"Label Studio at {self.url} refused a webhook to {url} (HTTP {getattr(answer, 'status_code', '?')}: "
                f"{getattr(answer, 'body', error)}); its SSRF protection refuses webhooks to loopback and private "
                "addresses: wait by polling (the default) or give a receiver address the server may reach"
            ) from error
        return hook.id

    def delete_webhook(self, webhook_id: int) -> None:
        self._call("removing a webhook", self.sdk.webhooks.delete, webhook_id)


def batched(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
