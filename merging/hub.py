"""Every call Merge Studio makes to the Hugging Face Hub: whose access, progress, Stop, and what a
failure means for the person who hit it.

- **Access.** Each call takes the ``token`` of the policy it runs under (``SourcePolicy.hub_token``):
  ``None`` lets ``huggingface_hub`` find this machine's (``HF_TOKEN``, ``hf auth login``), which the
  CLI and a local studio use; a string is a visitor's own OAuth token; ``False`` is anonymous, what a
  hosted studio uses for a visitor who has not signed in, so the server's token never reads a
  private or gated model on a visitor's behalf.
- **Progress and Stop.** Downloads report bytes, total and rate to whoever watches them
  (``watching``: the CLI prints a line, the studio moves its progress bar) and stop at the next
  chunk when the watcher's ``cancel`` event is set. The watch is a context variable rather than a
  parameter because every entry point (merge, evaluation, statistics, tuning, chat) resolves its
  models through the same few functions; threading a callback through all of them would change a
  dozen signatures for a display concern.
- **Resume.** ``huggingface_hub`` keeps every finished file in its cache, so running a stopped or
  cut download again fetches only the files it lacks. Since its 1.x rewrite (PR #4228) it deletes a
  half-written file instead of resuming it (temporary names are unique per process, to survive
  filesystems where locks do not work), so the file that was in flight starts over; within one
  run, a dropped connection is resumed from its last byte by ``huggingface_hub`` itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from merging.errors import Cancelled, SourceError, check_cancel, redact
from merging.units import format_bytes

Token = str | bool | None  # None: this machine's token; False: anonymous; str: that token

_HUB_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
STOPPED = "download stopped; the files already fetched are kept, and running it again fetches only the rest"


class DownloadCancelled(Cancelled):
    """A download was stopped by the user."""


@dataclass(frozen=True)
class DownloadProgress:
    """Where one repo's transfer stands: bytes moved this run of ``total`` (a download: the bytes
    still to fetch when it started; an upload: ``upload=True``, the folder's bytes)."""

    repo: str
    done: int
    total: int
    seconds: float
    finished: bool = False
    upload: bool = False

    @property
    def rate(self) -> float:
        """Bytes per second over the download so far."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 1.0

    def describe(self) -> str:
        """'downloading org/name: 1.2 GB of 4.5 GB at 85.0 MB/s'."""
        verb = "upload" if self.upload else "download"
        if self.finished:
            return f"{verb}ed {self.repo}: {format_bytes(self.done)} in {self.seconds:.0f} s"
        return (f"{verb}ing {self.repo}: {format_bytes(self.done)} of {format_bytes(self.total)} "
                f"at {format_bytes(self.rate)}/s")


@dataclass(frozen=True)
class Watch:
    progress: Callable[[DownloadProgress], None] | None = None
    cancel: threading.Event | None = None
    every_s: float = 0.25  # the most often ``progress`` is called while bytes arrive


_WATCH: contextvars.ContextVar[Watch | None] = contextvars.ContextVar("merge_studio_hub_watch", default=None)


@contextlib.contextmanager
def watching(progress: Callable[[DownloadProgress], None] | None = None, cancel: threading.Event | None = None,
             every_s: float = 0.25) -> Iterator[None]:
    """Within the block, Hub downloads made by this thread report to ``progress`` and stop when
    ``cancel`` is set (raising ``DownloadCancelled``)."""
    reset = _WATCH.set(Watch(progress, cancel, every_s))
    try:
        yield
    finally:
        _WATCH.reset(reset)


def snapshot_download(repo_id: str, revision: str | None, allow_patterns: list[str], token: Token = None) -> str:
    """The allowed files of a Hub repo in the local cache (fetching what is missing); its folder."""
    # Deferred: huggingface_hub takes a second to import, and local models never need it.
    from huggingface_hub import snapshot_download as hub_download

    watch = _WATCH.get()
    if watch is None:
        return hub_download(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, token=token)
    check_cancel(watch.cancel, STOPPED, DownloadCancelled)
    try:  # HEAD requests only: what is cached, what remains and its size
        planned = hub_download(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, token=token,
                               dry_run=True)
        total = sum(file.file_size or 0 for file in planned if file.will_download)
    except Exception:  # offline, private, gated...: the download itself serves the cache or says what is wrong
        total = 0
    tracker = _Tracker(repo_id + (f"@{revision}" if revision else ""), total, watch)
    folder = hub_download(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, token=token,
                          tqdm_class=tracker.bar_class())
    if total:
        tracker.finish()
    return folder


class _Tracker:
    """Counts the bytes ``huggingface_hub`` writes (its aggregated byte bar, updated from its
    download threads) and passes them on, at most every ``watch.every_s``; stops them on cancel."""

    BAR = "huggingface_hub.snapshot_download"  # the bytes-written bar; the others count files or transfers

    def __init__(self, repo: str, total: int, watch: Watch, upload: bool = False):
        self.repo, self.total, self.watch, self.upload = repo, total, watch, upload
        self.done, self.started, self.shown = 0, time.monotonic(), 0.0
        self.lock = threading.Lock()
        # huggingface_hub calls back from its own download threads; the watcher may read context
        # variables of the thread that started the download (Gradio's progress does), so each
        # report runs in a copy of that thread's context
        self.context = contextvars.copy_context()

    def add(self, count: int) -> None:
        check_cancel(self.watch.cancel, STOPPED, DownloadCancelled)  # raised in the download thread: it stops there
        with self.lock:
            self.done += count
            now = time.monotonic()
            due = now - self.shown >= self.watch.every_s
            if due:
                self.shown = now
            state = DownloadProgress(self.repo, min(self.done, self.total) if self.upload else self.done,
                                     max(self.total, self.done), now - self.started, upload=self.upload)
        if due and self.watch.progress is not None:
            self.context.copy().run(self.watch.progress, state)

    def finish(self) -> None:
        if self.watch.progress is not None:
            done = self.total if self.upload else self.done  # an upload's retries read some bytes twice
            self.watch.progress(DownloadProgress(self.repo, done, max(self.total, done),
                                                 time.monotonic() - self.started, finished=True, upload=self.upload))

    def bar_class(self):
        # Deferred: huggingface_hub takes a second to import, and local models never need it.
        from huggingface_hub.utils import tqdm as hub_tqdm

        tracker = self

        class Bar(hub_tqdm):
            """huggingface_hub's progress bar, silent, feeding the tracker."""

            def __init__(self, *args, **kwargs):
                self.counts_bytes = kwargs.get("name") == tracker.BAR
                kwargs["disable"] = True  # the watcher shows progress its own way
                super().__init__(*args, **kwargs)

            def update(self, n=1):
                if self.counts_bytes and n:
                    tracker.add(int(n))
                return super().update(n)

        return Bar


def upload_folder(folder: Path, repo_id: str, token: Token, message: str,
                  progress: Callable[[DownloadProgress], None] | None = None) -> str:
    """Commit every file of ``folder`` to the model repo ``repo_id`` with ``token`` (one commit;
    weights go through LFS), reporting bytes read for the upload to ``progress``; returns the
    commit's URL. ``HfApi.upload_folder`` has no progress hook, so the files are given as
    ``CommitOperationAdd`` file objects that count what the client reads from them."""
    # Deferred: huggingface_hub takes a second to import, and local models never need it.
    from huggingface_hub import CommitOperationAdd, HfApi

    files = sorted(path for path in Path(folder).rglob("*") if path.is_file())
    watch = Watch(progress)
    tracker = _Tracker(repo_id, sum(path.stat().st_size for path in files), watch, upload=True)
    readers = [_CountingReader(path) for path in files]
    try:
        operations = [CommitOperationAdd(path.relative_to(folder).as_posix(), reader)  # hashes the file first
                      for path, reader in zip(files, readers)]
        for reader in readers:
            reader.on_read = tracker.add  # from here on, reads are the upload
        commit = HfApi(token=token).create_commit(repo_id, operations, commit_message=message, repo_type="model")
    finally:
        for reader in readers:
            reader.close()
    tracker.finish()
    return commit.commit_url


class _CountingReader(io.BufferedReader):
    """A file opened for reading that reports the bytes read from it (once ``on_read`` is set)."""

    def __init__(self, path: Path):
        super().__init__(io.FileIO(path, "rb"))
        self.on_read: Callable[[int], None] | None = None

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if self.on_read is not None and data:
            self.on_read(len(data))
        return data


def hub_failure(ref: str, exc: Exception, doing: str = "download") -> str:
    """What went wrong reaching a Hub model, and what to do about it, for each case
    ``huggingface_hub`` tells apart (checked by class name, so nothing is imported to say it)."""
    repo, revision = split_revision(ref.split("+")[0])
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    reason = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if "GatedRepoError" in kinds:
        page = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{repo}"
        return (f"{repo} is a gated model: accept its conditions on its page ({page}) "
                "while signed in, then sign in here (or set HF_TOKEN to a token of that account) and try again")
    if "RepositoryNotFoundError" in kinds:
        return (f"{repo} was not found on the Hub, or it is private: check the id; for a private model, "
                "sign in (or set HF_TOKEN) with a token that can read it")
    if "RevisionNotFoundError" in kinds:
        return f"{repo} has no revision {revision!r}: check the branch, tag or commit after '@'"
    if "DisabledRepoError" in kinds:
        return f"{repo} has been disabled on the Hub; choose another model"
    if kinds & {"OfflineModeIsEnabled", "LocalEntryNotFoundError"}:
        return (f"cannot {doing} {ref!r}: the Hub is unreachable or offline mode is on (HF_HUB_OFFLINE), and it "
                "is not in the local cache")
    if kinds & {"ConnectError", "ConnectionError", "TimeoutException", "ReadTimeout", "ConnectTimeout"}:
        return f"cannot reach the Hugging Face Hub to {doing} {ref!r} ({reason}); check your network and try again"
    if kinds & {"RemoteProtocolError", "ReadError", "ChunkedEncodingError", "IncompleteRead", "ProtocolError"}:
        return (f"the download of {ref!r} was cut ({reason}); run it again: the files already fetched are kept "
                "and only the rest is fetched")
    hint = ("for a gated or private model, sign in (or set HF_TOKEN) with a token that can read it"
            if any(code in reason for code in ("401", "403")) else "check the id, the revision and your network")
    return f"cannot {doing} {ref!r} from the Hugging Face Hub ({type(exc).__name__}: {reason}); {hint}"


ACCESS_PROBES = ("config.json", "adapter_config.json")  # a file every model (or adapter) repo has


def check_access(repo_id: str, revision: str | None, token: Token) -> None:
    """Ask the Hub whether ``token`` (False: nobody) may read the repo's files: a HEAD request on
    one of them, which a private repo answers 401/404 and a gated one 401/403 to those without
    access. Needed because the download cache is shared: ``huggingface_hub`` serves a cached
    snapshot when the Hub refuses the listing (and a gated repo's listing is public), so
    without this a visitor could read what another visitor's token fetched."""
    # Deferred: huggingface_hub takes a second to import, and local models never need it.
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    for name in ACCESS_PROBES:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, name, revision=revision), token=token)
            return
        except Exception as exc:  # huggingface_hub raises many types: each case gets its own advice
            if "EntryNotFoundError" not in {cls.__name__ for cls in type(exc).__mro__}:
                raise SourceError(hub_failure(repo_id + (f"@{revision}" if revision else ""), exc, "read")) from None
    # readable, but neither a model nor an adapter: the caller says what is missing


def fetch(ref: str, patterns: list[str], download, token: Token = None) -> str:
    """``download(repo_id, revision, patterns, token)`` with every Hub failure as a ``SourceError``
    that says what to do; a Stop stays a ``DownloadCancelled``. With an explicit ``token`` (a
    visitor's, or False for one not signed in) the Hub is asked first whether it may read the repo."""
    repo_id, revision = split_revision(ref)
    if token is not None:
        check_access(repo_id, revision, token)
    try:
        return download(repo_id, revision, patterns, token)
    except Cancelled:
        raise
    except Exception as exc:  # huggingface_hub raises many error types: each case gets its own advice
        raise SourceError(hub_failure(ref, exc)) from None


def weights_bytes(repo_id: str, revision: str | None = None, token: Token = None) -> int:
    """Bytes of the safetensors files of a Hub repo, from its file listing (nothing downloaded)."""
    # Deferred: huggingface_hub takes a second to import, and local models never need it.
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True, token=token)
    except Exception as exc:  # huggingface_hub raises many types: each case gets its own advice
        raise SourceError(hub_failure(repo_id + (f"@{revision}" if revision else ""), exc, "look up")) from None
    return sum(s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors"))


def check_size(repo_id: str, revision: str | None, max_bytes: int, token: Token = None) -> None:
    """Refuse a Hub repo whose safetensors weights exceed ``max_bytes``, asking the Hub's file
    listing first, so a hosted studio never starts a 100 GB download."""
    size = weights_bytes(repo_id, revision, token)
    if size > max_bytes:
        raise SourceError(
            f"{repo_id} has {format_bytes(size)} of weights; this studio accepts models up to "
            f"{format_bytes(max_bytes)}. Choose a smaller model, or run Merge Studio yourself"
        )


def tensors(ref: str, token: Token = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of a Hub model's safetensors, from their headers only
    (``huggingface_hub.get_safetensors_metadata``: HTTP range reads of a few KB per file), so a
    checkpoint that cannot be merged is refused before any weight is downloaded."""
    # Deferred: huggingface_hub takes a second to import, and local models never need it.
    from huggingface_hub import get_safetensors_metadata

    repo_id, revision = split_revision(ref)
    try:
        metadata = get_safetensors_metadata(repo_id, revision=revision, token=token)
    except Exception as exc:  # huggingface_hub raises many types (not found, gated, no safetensors)
        raise SourceError(hub_failure(ref, exc, "read the safetensors headers of")) from None
    return {name: (tuple(tensor.shape), _HUB_DTYPES.get(tensor.dtype, tensor.dtype.lower()))
            for file in metadata.files_metadata.values() for name, tensor in file.tensors.items()}


def split_revision(ref: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); (``ref``, None) without a revision."""
    if "@" in ref:
        name, revision = ref.rsplit("@", 1)
        return name, revision or None
    return ref, None
