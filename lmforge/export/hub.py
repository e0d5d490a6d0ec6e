"""hub_model_id: the finished run's output folder pushed to a Hugging Face Hub model repo (huggingface_hub's own
upload), once, after the weights, tokenizer, config and summary are written.

A push that fails (no network, no token, no permission) costs nothing already made: the error line names the repo,
the reason and the ``hf upload`` command that finishes the job from the output folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmforge.errors import LmforgeError

# Checkpoints stay local (resume state, optimizer files): the repo gets the trained model and its reports.
NOT_PUSHED = ["checkpoint-*", "checkpoint-*/**", ".*", "*.lock", "runs/**"]


def push_output(folder: Path, repo_id: str, revision: str | None, say: Callable[[str], None]) -> str:
    """Create the repo and branch when missing, then upload `folder` (without its checkpoints); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                   ignore_patterns=NOT_PUSHED, commit_message="lmforge train: trained model")
    except Exception as exc:  # network, auth and Hub errors come in many types; the cause is in the line
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise LmforgeError(f"the run finished, but pushing {folder} to the Hub repo {repo_id} failed "
                           f"({type(exc).__name__}: {reason})", where="hub_model_id",
                           fix=f"the trained model is in {folder}; upload it when the network and HF_TOKEN allow: "
                           f"hf upload {repo_id} {folder}" + (f" --revision {revision}" if revision else "")) from exc
    url = str(getattr(commit, "commit_url", commit))
    say(f"pushed {folder} to the Hub: {url}")
    return url
