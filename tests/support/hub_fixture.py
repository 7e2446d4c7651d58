"""The ``hub`` pytest fixture: a local Hub server (``tests.support.hub_server``) the real
``huggingface_hub`` client reaches, for this process and for the CLI processes a test starts.

How the endpoint is wired (huggingface_hub 2.4 reads its settings once, at import, into
``huggingface_hub.constants``):

- Processes a test starts (``run_cli``, ``subprocess``) get it the supported way:
  environment variables set before they import the client: ``HF_ENDPOINT``, ``HF_HOME`` and
  ``HF_HUB_CACHE`` (a temporary folder, so the user's cache and stored token are never touched),
  ``HF_HUB_OFFLINE=0`` (``tests/helpers._cli_env`` defaults it to 1), ``HF_HUB_DISABLE_TELEMETRY=1``,
  ``HF_HUB_DISABLE_XET=1`` (with ``hf_xet`` installed the client uploads through Xet storage,
  which this server does not speak; it takes the LFS "basic" transfer instead, and downloads
  never use Xet since the server sends no ``X-Xet-Hash``);
  ``HF_TOKEN`` is removed (a test sets it to ``hub.token`` to authenticate).
  ``tests/helpers.run_cli`` sees the changed ``HF_*`` variables and starts a fresh
  ``python -m merging`` instead of forking its warm process (which imported the client with the
  session's own environment and always keeps it).
- This process: the same environment, plus the module globals derived from it at import:
  ``constants.ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_HOME``, ``HF_HUB_CACHE``,
  ``HF_TOKEN_PATH``, ``HF_STORED_TOKENS_PATH``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``, and the ``endpoint`` of the
  module-level ``huggingface_hub.hf_api.api`` (the instance behind the package's top-level
  functions such as ``get_safetensors_metadata``). Every client function reads these at call
  time, so no function of the client is replaced. ``monkeypatch`` restores them all.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.hub_server import HubServer


def point_client_at(server: HubServer, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Send ``huggingface_hub`` (this process and the processes it starts) to ``server``."""
    import huggingface_hub.hf_api
    from huggingface_hub import constants

    cache = home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(cache),
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_XET": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)


@pytest.fixture()
def hub(tmp_path_factory, monkeypatch):
    """A running local Hub with nothing published; ``hub.publish("org/name", folder, ...)`` adds repos.

    The client in this process and in processes started from the test talks to it (see the module
    docstring), with an empty cache of its own. ``hub.token`` is the valid token.
    """
    root = tmp_path_factory.mktemp("hub")
    server = HubServer(root / "server").start()
    try:
        point_client_at(server, root / "hf-home", monkeypatch)
        yield server
    finally:
        server.stop()
