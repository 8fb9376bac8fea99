"""The SINKLORA member of vLLM's attention-backend enum, registered when this module is imported.

vLLM pickles its config into the engine-core process, and an enum member pickles as its value,
which the child looks up before it loads plugins. The value is therefore a :class:`BackendPath`:
unpickling it imports this module, which registers the member, so the lookup finds it."""

from __future__ import annotations

from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from .config import BACKEND_NAME


class BackendPath(str):
    """The backend's class path; a ``str`` whose unpickling imports this module."""

    def __reduce__(self):
        return BackendPath, (str(self),)


BACKEND_PATH = BackendPath("sinklora_ext.vllm.backend.SinkLoRABackend")


def register_member() -> AttentionBackendEnum:
    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_PATH)
    return AttentionBackendEnum[BACKEND_NAME]


register_member()
