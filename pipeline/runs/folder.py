"""The run folder every command keeps (`rlpipe train`, `rlpipe sft`, `rlpipe reward-model`): claimed, refused,
replaced or reopened by one set of rules, before anything is written.

A folder tells which command made it by its settings file (`RUN_FOLDER_SETTINGS`). Starting a run in a folder
that holds one is refused unless the user asks to replace it (`--overwrite`) or to continue it (`--resume`);
resuming a folder another command made names that command and how to resume it.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from pipeline.errors import UserInputError

# The file each command's run folder holds its settings in.
RUN_FOLDER_SETTINGS = {"sft.yaml": "rlpipe sft", "reward_model.yaml": "rlpipe reward-model",
                       "config.yaml": "rlpipe train"}


class RunFolderError(UserInputError):
    """A run folder that already holds a run, holds none to resume, or is another command's."""


def run_folder_command(run_dir) -> Optional[str]:
    """The command whose run folder `run_dir` is ("rlpipe sft", ...), from its settings file; None if none."""
    return next((command for name, command in RUN_FOLDER_SETTINGS.items() if (Path(run_dir) / name).is_file()),
                None)


def claim_run_folder(run_dir, settings_name: str, *, resume: bool, overwrite: bool, where: str) -> Path:
    """Check `run_dir` for a run of the command whose settings file is `settings_name`, and prepare it:
    resume -> it must hold this command's run; otherwise a folder holding any run is refused, or removed with
    overwrite. `where`: how the user named the folder (`train.output_dir`, `--out`), for the messages.
    -> the folder, which exists afterwards."""
    out = Path(run_dir)
    command = RUN_FOLDER_SETTINGS[settings_name]
    made_by = run_folder_command(out)
    if resume:
        if made_by is not None and made_by != command:
            raise RunFolderError(f"{out} is a run folder of `{made_by}`, not of `{command}`; resume it with "
                                 f"`{made_by} --resume {out}`")
        if made_by is None:
            raise RunFolderError(f"--resume: {out} holds no {command} run (no {settings_name}); give the {where} "
                                 "of an earlier run")
    elif made_by is not None:
        if not overwrite:
            raise RunFolderError(f"{where} {str(out)!r} already holds a run; pass --resume to continue it, "
                                 f"--overwrite to replace it, or choose another {where}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


__all__ = ["RUN_FOLDER_SETTINGS", "RunFolderError", "run_folder_command", "claim_run_folder"]
