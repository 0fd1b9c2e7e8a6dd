"""Whether a Hugging Face hub model can be had: in the local cache, or the hub answers for it.

SD's weights and the prompt-writing language model are checked this way before a run folder is
made, so a run that cannot start says so in one line and in seconds.
"""

from __future__ import annotations

from .errors import UserError, first_line

HUB_TIMEOUT_S = 10
"""The one request asking the hub whether a model not in the cache is there."""


def hub_model_ready(ref: str, revision: str | None, marker: str, local: str, what: str = "") -> None:
    """``ref`` holds ``marker`` in the local cache, or the hub answers for it within seconds; else
    one line naming the way out (``local``)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(huggingface_hub.try_to_load_from_cache(ref, marker, revision=revision), str):
        return
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UserError(f"{what}{ref} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {local}")
    try:
        # One bounded request, no retries (model_info does not back off): seconds, not minutes.
        huggingface_hub.HfApi().model_info(ref, revision=revision, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise UserError(f"{what}{ref} (revision {revision or 'main'}) is not on the Hugging Face hub ({type(err).__name__}); {local}") from None
    except GatedRepoError:
        raise UserError(f"{what}{ref} needs a Hugging Face login (huggingface-cli login); or {local}") from None
    except Exception as err:  # noqa: BLE001 - the hub client's transport errors share no base with OSError
        raise UserError(f"cannot reach the Hugging Face hub for {what}{ref} ({type(err).__name__}: {first_line(err)}); {local}") from None
