"""The one policy for everything fetched from a hub or a URL: offline switches, reachability, cache-only loads.

Backbone weights (:mod:`mr2ft.backbones`) and datasets (:mod:`mr2ft.data.hf`) both ask here, so they agree:

- Offline when ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set (1/on/yes/true), or
  when ``huggingface_hub`` / ``datasets`` was told so in-process.
- Otherwise the endpoint (``HF_ENDPOINT``, default https://huggingface.co, or the URL itself) is probed with one TCP
  connection, through the proxy that ``requests``, ``httpx`` and ``urllib`` would use for that URL (``HTTPS_PROXY``,
  ``HTTP_PROXY``, ``ALL_PROXY``, honouring ``NO_PROXY``), within :data:`TIMEOUT_S` seconds, DNS included. Hub
  clients retry a dead network for tens of seconds; this probe lets a load fail at once instead.
- When offline or unreachable, only local caches are used, and a file that is not cached fails at once with where it
  was looked for and how to pass a local copy.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from mr2ft.errors import UserError

#: Seconds a reachability probe or a hub request may take before the hub counts as unreachable.
TIMEOUT_S = 5.0

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "on", "yes", "true")


def endpoint() -> str:
    """The Hugging Face hub endpoint: ``HF_ENDPOINT``, else huggingface_hub's default."""
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline_switch() -> str | None:
    """The variable that switches the hub off (e.g. ``"HF_HUB_OFFLINE is set"``), or None."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name} is set"
    # In-process switches (tests, notebooks): only look at libraries already imported, never import them here.
    hub_constants = sys.modules.get("huggingface_hub.constants")
    ds_config = sys.modules.get("datasets.config")
    if getattr(hub_constants, "HF_HUB_OFFLINE", False) or getattr(ds_config, "HF_HUB_OFFLINE", False):
        return "HF_HUB_OFFLINE is set"
    if getattr(ds_config, "HF_DATASETS_OFFLINE", False):
        return "HF_DATASETS_OFFLINE is set"
    return None


def _proxy_for(url: str) -> str | None:
    """The proxy ``requests`` / ``urllib`` would use for ``url`` (from the environment), or None."""
    parsed = urllib.parse.urlparse(url)
    host = parsed.hostname or ""
    if not host or urllib.request.proxy_bypass(host):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parsed.scheme) or proxies.get("all")


def reachable(url: str, timeout: float = TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host, or to the proxy used for it, opens within ``timeout`` seconds."""
    target = _proxy_for(url) or url
    parsed = urllib.parse.urlparse(target if "://" in target else f"http://{target}")
    host = parsed.hostname
    if not host:
        return False
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        return False

    def connect() -> bool:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            return False

    # getaddrinfo has no timeout of its own: run it in a thread and stop waiting after ``timeout``.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout + 0.5)
    except concurrent.futures.TimeoutError:
        return False
    finally:
        pool.shutdown(wait=False)


def offline_reason(url: str | None = None) -> str | None:
    """Why ``url`` (default: the hub endpoint) must not be contacted, in words, or None when it may be."""
    switch = offline_switch()
    if switch:
        return switch
    url = url or endpoint()
    if not reachable(url):
        host = urllib.parse.urlparse(url).hostname or url
        proxy = _proxy_for(url)
        return f"{host} cannot be reached" + (f" (through the proxy {proxy})" if proxy else "")
    return None


@contextlib.contextmanager
def cache_only() -> Iterator[None]:
    """Make ``huggingface_hub`` (and ``datasets``) use their caches without trying the network.

    Without this, ``datasets`` retries an unreachable hub for ~25 s before giving up.
    """
    import huggingface_hub.constants

    targets = [(huggingface_hub.constants, "HF_HUB_OFFLINE")]
    ds_config = sys.modules.get("datasets.config")
    if ds_config is not None:
        targets += [(ds_config, "HF_HUB_OFFLINE"), (ds_config, "HF_DATASETS_OFFLINE")]
    saved = [getattr(obj, name) for obj, name in targets]
    for obj, name in targets:
        setattr(obj, name, True)
    try:
        yield
    finally:
        for (obj, name), value in zip(targets, saved, strict=True):
            setattr(obj, name, value)


def hf_cache_dir(cache_dir: str | None = None) -> str:
    """The Hugging Face hub cache folder a download would use."""
    if cache_dir:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_download(
    repo_id: str,
    filenames: Sequence[str],
    *,
    cache_dir: str | None = None,
    what: str,
    required: bool = True,
) -> Path | None:
    """Fetch the first of ``filenames`` that ``repo_id`` (``org/name[@revision]``) has, from the cache or the hub.

    Offline or without a connection, only the local cache is used, and a file that is not cached fails at once with
    where we looked and how to pass a local file.

    Raises:
        UserError: none of the files can be had (only when ``required``; otherwise None is returned).
    """
    from huggingface_hub import errors, hf_hub_download

    repo, _, revision = repo_id.partition("@")
    offline = offline_reason()
    problems: list[str] = []
    for filename in filenames:
        try:
            path = hf_hub_download(
                repo,
                filename,
                revision=revision or None,
                cache_dir=cache_dir,
                local_files_only=offline is not None,
                etag_timeout=TIMEOUT_S,
            )
            return Path(path)
        except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
            raise UserError(
                f"the Hugging Face repository {repo} for {what} cannot be accessed ({e.__class__.__name__}); "
                "check the name (and `hf auth login` for gated repos), or pass a local file with --weights"
            ) from None
        except errors.RevisionNotFoundError:
            raise UserError(f"revision {revision!r} of {repo} does not exist; check the name after '@'") from None
        except (errors.EntryNotFoundError, errors.HfHubHTTPError, OSError, ValueError) as e:
            problems.append(f"{filename}: {e.__class__.__name__}")
    if not required:
        return None
    cache = hf_cache_dir(cache_dir)
    if offline is not None:
        raise UserError(
            f"found no copy of {what} ({repo}: {', '.join(filenames)}) in the Hugging Face cache {cache}, and "
            f"{offline}; download it where the hub is reachable, or pass a local file with --weights /path/to/file"
        )
    raise UserError(
        f"could not fetch {what} from the Hugging Face hub ({repo}: {'; '.join(problems)}; cache {cache}); "
        "pass a local file with --weights /path/to/file"
    )


def url_download(url: str, cache_dir: str | None, what: str) -> Path:
    """Fetch a plain URL into the torch hub cache (``<cache>/checkpoints``), failing fast without a network.

    Raises:
        UserError: the file is not cached and cannot be downloaded.
    """
    from torch.hub import download_url_to_file, get_dir

    folder = Path(cache_dir) if cache_dir else Path(get_dir()) / "checkpoints"
    target = folder / os.path.basename(urllib.parse.urlparse(url).path)
    if target.is_file():
        return target
    reason = offline_reason(url)
    if reason:
        raise UserError(
            f"{what} is not cached at {target} and {reason}; download {url} yourself and pass it with "
            "--weights /path/to/file"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the download folder {folder} ({e.strerror}); pass --cache-dir") from None
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30.0)  # urllib has no timeout of its own: a stalled server would hang forever
    try:
        download_url_to_file(url, str(target), progress=False)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        raise UserError(f"downloading {what} from {url} failed ({e}); pass a local file with --weights") from None
    finally:
        socket.setdefaulttimeout(old)
    return target
