"""Share trained DDPMs on the Hugging Face Hub, and load them back by repo id.

    >>> from hf_ddpm.hub import load_pipeline, push_to_hub
    >>> push_to_hub("output", "me/ddpm-digits")      # pipeline, model card, samples and metrics, in one commit
    'https://huggingface.co/me/ddpm-digits/commit/...'
    >>> pipe = load_pipeline("me/ddpm-digits")       # or a local folder; revision= a branch, tag or commit

Pushing uses huggingface_hub (`create_repo`, `create_branch`, `create_commit`): unchanged files are skipped and
LFS objects already on the Hub are not sent again, so re-running a failed push completes it (also one whose
commit went through but whose answer was lost). huggingface_hub's `http_backoff` retries the LFS uploads and
pre-upload checks; each step of a push is retried here too, as a whole: transient failures (5xx, 408, connection
errors, timeouts) with exponential backoff, a 429 after the wait its Retry-After (or ratelimit) header asks for;
other 4xx answers are not retried. The output folder is only read: the model card is rendered in memory for the
repo. `checkpoints/` and `logs/` stay local unless asked.

The token comes from the argument, else `HF_TOKEN`, else `hf auth login`'s cache; it never appears in a log
line, an error message or an uploaded file (a push that would upload it is refused). Failures are raised as
`HubError` with one line that says what to fix.

Training pushes through `BackgroundPusher`, which checks write access before the first step
(`check_push_access`), pushes from a thread, and lets training go on when an intermediate push fails.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import (
    DEFAULT_IGNORE_PATTERNS,
    filter_repo_objects,
    httpx,
    parse_ratelimit_headers,
    validate_repo_id,
)

from hf_ddpm.cli import one_line
from hf_ddpm.errors import ConfigError, HubError, UserError
from hf_ddpm.model_card import card_was_edited, render_model_card

if TYPE_CHECKING:
    from hf_ddpm.pipeline import DDPMPipeline

logger = logging.getLogger(__name__)

TOKEN_HINT = "pass --hub_token, set HF_TOKEN or run `hf auth login`"
RETRY_WAIT_S = 1.0  # first backoff delay; doubles after each failed attempt
MAX_RETRIES = 5  # retries of each step of a push
_MAX_WAIT_S = 30.0
MAX_RATE_LIMIT_WAIT_S = 300.0  # the longest Retry-After honoured
_RETRIED_4XX = (408, 429)  # a request timeout and "too many requests", as huggingface_hub's http_backoff
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_T = TypeVar("_T")
_WHOAMI = "asking the Hub whose token this is"
_PUSH_ERRORS = (HfHubHTTPError, httpx.HTTPError, OSError, RuntimeError, ValueError)  # what a push turns into HubError


def redact(text: str, token: str | None = None) -> str:
    """`text` with `token`, and anything shaped like a Hugging Face token (`hf_...`), masked."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    push_checkpoints: bool = False,
    push_logs: bool = False,
    commit_message: str | None = None,
    overwrite_model_card: bool = False,
    endpoint: str | None = None,
    max_retries: int = MAX_RETRIES,
) -> str:
    """Upload a training output folder to the Hub repo `repo_id` in one commit; return the commit URL.

    `repo_id` is "namespace/name", or "name" for the token's user. The repo is created if missing (`private`
    applies then), and so is the branch `revision` (from main). The commit holds everything in `output_dir`
    except `checkpoints/` (unless `push_checkpoints`), `logs/` (unless `push_logs`) and hidden files, plus the
    model card rendered for `repo_id`. A README.md on the Hub that was edited by hand is kept unless
    `overwrite_model_card`; a README.md in `output_dir` edited by hand is pushed as it is. `endpoint` defaults to
    `HF_ENDPOINT`; `max_retries` bounds the retries of each step. A file holding the token is never uploaded.
    """
    folder = Path(output_dir)
    if not (folder / "model_index.json").is_file():
        raise HubError(f"{folder} is not a pipeline folder (no model_index.json): pass the training output_dir")
    api, token = _push_client(token, endpoint)
    paths = _files_to_push(folder, push_checkpoints, push_logs)

    def retrying(step: str, call: Callable[[], _T]) -> _T:
        return _with_retries(call, step, max_retries, token)

    try:
        if "/" not in repo_id:  # the token's own namespace, which the card's usage snippet must name
            repo_id = f"{retrying(_WHOAMI, api.whoami)['name']}/{repo_id}"
        card = _card_text(folder, repo_id)
        _refuse_token_upload(folder, paths, card, token)
        retrying("creating the repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
        if revision is not None:
            retrying("creating the branch", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
        keep_remote_card = not overwrite_model_card and retrying(
            "reading the model card on the Hub", lambda: _remote_card_was_edited(api, repo_id, revision, card)
        )
        if keep_remote_card:
            logger.warning(
                "kept the README.md of %s: it was edited on the Hub; pass --overwrite_model_card to replace it", repo_id
            )
        logger.info("pushing %d files from %s to %s", len(paths) + (not keep_remote_card), folder, repo_id)
        info = retrying(
            "committing",
            lambda: api.create_commit(
                repo_id,
                operations=[
                    *(CommitOperationAdd(path_in_repo=path, path_or_fileobj=folder / path) for path in paths),
                    *([] if keep_remote_card else [CommitOperationAdd("README.md", card.encode("utf-8"))]),
                ],
                commit_message=commit_message or "Upload DDPM pipeline, model card, samples and metrics (hf_ddpm)",
                revision=revision,
            ),
        )
    except HubError:
        raise
    except _PUSH_ERRORS as err:
        raise HubError(_push_error_message(err, repo_id, token)) from err
    logger.info("pushed %s: %s", repo_id, info.commit_url)
    return info.commit_url


def check_push_access(repo_id: str, *, token: str | None = None, endpoint: str | None = None) -> str:
    """Raise HubError unless `token` may push to `repo_id` (ConfigError if it is no repo id); return it as
    "namespace/name".

    One `whoami` call, nothing created: the token must be valid and not read-only, and the namespace must be
    its user's or one of the user's organisations (a read-only member is refused). A bare "name" goes to the
    token's user. The scopes of a fine-grained token are not checked; the first push finds those out.
    """
    api, token = _push_client(token, endpoint)
    try:
        me = _with_retries(api.whoami, _WHOAMI, MAX_RETRIES, token)
    except _PUSH_ERRORS as err:
        raise HubError(_push_error_message(err, repo_id, token)) from err
    full_id = repo_id if "/" in repo_id else f"{me['name']}/{repo_id}"
    check_repo_id(full_id)
    if me.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise HubError(f"the token is read-only and cannot push to {full_id}: {TOKEN_HINT} with a write token")
    writable = [me["name"], *(org["name"] for org in me.get("orgs", []) if org.get("roleInOrg") != "read")]
    namespace = full_id.split("/")[0]
    if namespace not in writable:
        raise HubError(
            f"the token cannot write to {full_id}: it is {me['name']}'s, who can write to {', '.join(writable)}; "
            f"change --hub_model_id, or {TOKEN_HINT} with a token of {namespace}"
        )
    return full_id


def check_repo_id(repo_id: str) -> None:
    """Raise ConfigError unless `repo_id` has the form of a Hub repo id, "namespace/name" or "name"."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"--hub_model_id {repo_id} is not a valid repo id: {one_line(err)}") from err


def push_options(args: Any) -> dict[str, Any]:
    """`push_to_hub`'s keyword arguments from command-line flags of the same names (`--hub_token`,
    `--hub_private_repo`, `--hub_revision`, `--push_checkpoints`, `--push_logs`, `--overwrite_model_card`), as
    `scripts/push_to_hub.py` and `scripts/train.py` both spell them."""
    return {
        "token": args.hub_token,
        "private": args.hub_private_repo,
        "revision": args.hub_revision,
        "push_checkpoints": args.push_checkpoints,
        "push_logs": args.push_logs,
        "overwrite_model_card": args.overwrite_model_card,
    }


class BackgroundPusher:
    """Pushes a training output folder to the Hub from a thread, so training never waits on the Hub.

    Made before training starts, it checks write access (`check_push_access`) so a bad token or repo id fails
    in seconds. `push()` starts a push after the previous one finished; a push that fails is logged as a
    warning (once, until a push succeeds again) and the next one, which sends the whole folder, retries it.
    `finish()` pushes one last time and raises HubError if that fails, leaving the folder as it is.
    `push_options` go to `push_to_hub` (`private`, `revision`, `push_checkpoints`, ...).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        repo_id: str,
        *,
        token: str | None = None,
        endpoint: str | None = None,
        **push_options: Any,
    ) -> None:
        self.repo_id = check_push_access(repo_id, token=token, endpoint=endpoint)
        self.output_dir = output_dir
        self.push_options = {"token": token, "endpoint": endpoint, **push_options}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self.pending: Future[str] | None = None
        self.failing = False  # the last push failed and was logged

    def push(self, what: str) -> None:
        """Start pushing the folder now, with "hf_ddpm: `what`" as the commit message."""
        self.wait()
        self.pending = self.pool.submit(self._push, what)

    def wait(self) -> None:
        """Wait for the push in flight; log its failure instead of raising it."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        try:
            pending.result()
        except HubError as err:
            if not self.failing:
                logger.warning("a push to the Hub failed; training goes on and the next push retries: %s", err)
            self.failing = True
        else:
            self.failing = False

    def finish(self, what: str) -> str:
        """Push the folder in this thread and return the commit URL; raise HubError if that push fails."""
        self.wait()
        self.pool.shutdown()
        try:
            return self._push(what)
        except HubError as err:
            raise HubError(
                f"{err}. The run is complete in {self.output_dir}; push it later with: "
                f"python scripts/push_to_hub.py {self.output_dir} --hub_model_id {self.repo_id}"
            ) from err

    def _push(self, what: str) -> str:
        return push_to_hub(self.output_dir, self.repo_id, commit_message=f"hf_ddpm: {what}", **self.push_options)


def load_pipeline(
    repo_id_or_path: str | os.PathLike, revision: str | None = None, token: str | None = None, **kwargs: Any
) -> DDPMPipeline:
    """Load an hf_ddpm (or plain diffusers) DDPM pipeline from a Hub repo id or a local folder.

    `revision` is a branch, tag or commit; `token` defaults to `HF_TOKEN` / the login cache; `kwargs` go to
    `hf_ddpm.pipeline.DDPMPipeline.from_pretrained` (`cache_dir`, `local_files_only`, `allow_pickle`, ...).
    Raises `HubError` in one line for a missing repo or revision, a token the Hub refuses, offline mode without
    a cached copy, a folder/repo that is not a DDPM pipeline, or weights that cannot be read.
    """
    from hf_ddpm.pipeline import DDPMPipeline  # torch and diffusers load here, not for pushing

    source = os.fspath(repo_id_or_path)
    try:
        _check_ddpm_index(source, revision, token, kwargs.get("cache_dir"), kwargs.get("local_files_only", False))
        return DDPMPipeline.from_pretrained(source, revision=revision, token=token, **kwargs)
    except UserError:  # HubError, PickleWeightsError
        raise
    except (HfHubHTTPError, httpx.HTTPError, OSError, ValueError) as err:
        message = _load_error_message(err, source, revision, token, kwargs.get("cache_dir"))
        raise HubError(message or f"cannot load model {source!r}: {one_line(err)}") from err


def _push_client(token: str | None, endpoint: str | None) -> tuple[HfApi, str | None]:
    """The HfApi to push with and the token it uses (the argument, else HF_TOKEN, else the login cache)."""
    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE=1 is set: unset it to push to the Hub")
    token = token or get_token()
    return HfApi(endpoint=endpoint, token=token), token


def _files_to_push(folder: Path, push_checkpoints: bool, push_logs: bool) -> list[str]:
    """Repo paths of the files to upload (the model card is rendered separately)."""
    ignore = [*DEFAULT_IGNORE_PATTERNS, ".*", "*/.*", "README.md"]
    ignore += [] if push_checkpoints else ["checkpoints/*"]
    ignore += [] if push_logs else ["logs/*"]
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=ignore))


def _card_text(folder: Path, repo_id: str) -> str:
    """The card to push: the local README.md if edited by hand, else a fresh one naming `repo_id`."""
    local = folder / "README.md"
    if local.is_file() and card_was_edited(text := local.read_text(encoding="utf-8")):
        logger.info("pushing %s as the model card: it was edited by hand", local)
        return text
    return str(render_model_card(folder, repo_id=repo_id))


def _refuse_token_upload(folder: Path, paths: list[str], card: str, token: str | None) -> None:
    """Raise HubError if any file to push, or the card, contains the token (e.g. saved training arguments)."""
    if not token:
        return
    leaks = [path for path in paths if _file_contains(folder / path, token.encode())]
    leaks += ["README.md"] if token in card else []
    if leaks:
        raise HubError(f"refusing to push: {', '.join(leaks)} contain(s) the Hub token; remove it from the file(s)")


def _file_contains(path: Path, needle: bytes) -> bool:
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return False
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as content:
            return content.find(needle) != -1


def _remote_card_was_edited(api: HfApi, repo_id: str, revision: str | None, card: str) -> bool:
    """Whether the repo has a README.md that differs from `card` and was edited by hand."""
    with tempfile.TemporaryDirectory() as cache:  # not the user's HF cache, and never the output folder
        try:
            remote = Path(api.hf_hub_download(repo_id, "README.md", revision=revision, cache_dir=cache))
        except RemoteEntryNotFoundError:
            return False
        text = remote.read_text(encoding="utf-8")
    return text != card and card_was_edited(text)


def _with_retries(call: Callable[[], _T], step: str, max_retries: int, token: str | None) -> _T:
    """`call()`, retried with exponential backoff while it fails transiently, at most `max_retries` times."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as err:
            if attempt == max_retries or not _is_transient(err):
                raise
            asked = _retry_after(err)
            wait = min(RETRY_WAIT_S * 2**attempt, _MAX_WAIT_S) if asked is None else min(asked, MAX_RATE_LIMIT_WAIT_S)
            attempt += 1
            logger.warning(
                "%s failed (%s); retry %d/%d in %.0f s", step, redact(one_line(err), token), attempt, max_retries, wait
            )
            time.sleep(wait)


def _causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and the exceptions it was raised from (huggingface_hub and diffusers wrap the HTTP errors)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_status(err: BaseException) -> int | None:
    """The status of the first HTTP answer in the chain of `err`, if any."""
    for cause in _causes(err):
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            return cause.response.status_code
    return None


def _is_transient(err: BaseException) -> bool:
    """5xx, 408 and 429 answers, connection errors and timeouts; no other 4xx answer."""
    for cause in _causes(err):
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            return cause.response.status_code >= 500 or cause.response.status_code in _RETRIED_4XX
        if isinstance(cause, httpx.TransportError):
            return True
    return False


def _retry_after(err: BaseException) -> float | None:
    """The seconds a 429 answer in the chain of `err` asks to wait (ratelimit or Retry-After header), if any."""
    for cause in _causes(err):
        if isinstance(cause, HfHubHTTPError) and cause.response is not None and cause.response.status_code == 429:
            headers = cause.response.headers
            limit = parse_ratelimit_headers(headers)
            if limit is not None and limit.remaining == 0:
                return float(limit.reset_in_seconds)
            value = headers.get("Retry-After", "").strip()
            return float(value) if value.isdigit() else None  # the HTTP-date form is not used by the Hub
    return None


def _push_error_message(err: BaseException, repo_id: str, token: str | None) -> str:
    status = _http_status(err)
    if status == 401 or isinstance(err, LocalTokenNotFoundError):
        if token:
            return f"the Hub rejected the token (401): {TOKEN_HINT} with a valid token"
        return f"no Hugging Face token found, and the Hub needs one to push: {TOKEN_HINT}"
    if status == 403:
        return f"the token cannot write to {repo_id} (403): {TOKEN_HINT} with a token that has write access to it"
    return f"pushing to {repo_id} failed: {redact(one_line(err), token)}"


# the pipelines load_pipeline loads: a DDPM, and a consistency model distilled from one (both a unet and a scheduler)
PIPELINES = ("DDPMPipeline", "ConsistencyModelPipeline")


def _check_ddpm_index(
    source: str, revision: str | None, token: str | None, cache_dir: str | None, local_files_only: bool
) -> None:
    """Raise HubError unless `source`'s model_index.json describes one of `PIPELINES` with a unet and a scheduler."""
    if Path(source).is_dir():
        index_path = Path(source) / "model_index.json"
        if not index_path.is_file():
            raise HubError(f"{source} is not a DDPM pipeline: it has no model_index.json")
    else:
        try:
            index_path = Path(
                hf_hub_download(
                    source,
                    "model_index.json",
                    revision=revision,
                    token=token,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                )
            )
        except RemoteEntryNotFoundError as err:
            raise HubError(f"{source} is not a DDPM pipeline: the repo has no model_index.json") from err
    index = json.loads(index_path.read_text(encoding="utf-8"))
    components = [name for name in ("unet", "scheduler") if (index.get(name) or [None])[-1]]
    if index.get("_class_name") not in PIPELINES or len(components) < 2:
        raise HubError(
            f"{source} is not a DDPM pipeline: its model_index.json describes {index.get('_class_name')!r} with "
            f"components {sorted(k for k in index if not k.startswith('_'))}; a DDPMPipeline with a unet and a "
            "scheduler is needed"
        )


def _load_error_message(
    err: BaseException, source: str, revision: str | None, token: str | None, cache_dir: str | None
) -> str | None:
    """One line explaining why loading `source` failed, or None for errors that are not about the Hub."""
    causes = list(_causes(err))
    status = _http_status(err)
    where = f"{source} at revision {revision!r}" if revision else source

    def found(*kinds: type[BaseException]) -> bool:
        return any(isinstance(cause, kinds) for cause in causes)

    if found(RevisionNotFoundError):
        return f"revision {revision or 'main'!r} does not exist in {source}: check the branch, tag or commit"
    if found(GatedRepoError):
        return f"{source} is gated: accept its conditions on its Hub page, then {TOKEN_HINT}"
    if status == 401 and not found(RepositoryNotFoundError):
        return f"the Hub rejected the token (401) for {source}: {TOKEN_HINT} with a valid token"
    if found(RepositoryNotFoundError):
        if token or get_token():
            return f"repository {source} not found on the Hub, or the token cannot read it: check the repo id"
        return f"repository {source} not found on the Hub: check the repo id; if it is private, {TOKEN_HINT}"
    if status == 403:
        return f"the token cannot read {source} (403): {TOKEN_HINT} with a token that has read access"
    if found(HFValidationError):
        return f"{source} is neither a local folder nor a valid Hub repo id"
    cache = cache_dir or constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE and found(LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError):
        return (
            f"HF_HUB_OFFLINE=1 is set and {where} is not in the HF cache ({cache}): "
            "load it once with HF_HUB_OFFLINE unset, or pass a local folder"
        )
    if found(LocalEntryNotFoundError, httpx.TransportError):
        return (
            f"could not reach the Hub at {constants.ENDPOINT} and {where} is not in the HF cache ({cache}): "
            "check the connection and HF_ENDPOINT"
        )
    return None
