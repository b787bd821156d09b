"""The run folder: what `--output_dir` may hold (the output policy), the writer's lock, atomic moves into place, and
the run files (the config less secrets, results, logs) written beside a saved model."""

import json
import os
import shutil

from common.errors import UserError

STAGING = ".final.partial"  # where a final save writes a model before moving it into the output folder
TRAINER_STATE = "trainer_state.json"


def _previous_script(folder):
    """The script whose run a folder holds: finished (training_args.json) or not (checkpoints, or the
    stages/stageN runs of a progressive distillation stopped before its last stage); else None."""
    paths = [os.path.join(folder, "training_args.json")]
    checkpoints = os.path.join(folder, "checkpoints")
    if os.path.isdir(checkpoints):
        paths += [os.path.join(checkpoints, name, "trainer_state.json") for name in sorted(os.listdir(checkpoints))]
    for path in paths:
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    return json.load(handle).get("script", "an unknown script")
            except (OSError, ValueError):
                return "an unknown script"
    stages = os.path.join(folder, "stages")
    if os.path.isdir(stages):
        for name in sorted(os.listdir(stages)):
            found = _previous_script(os.path.join(stages, name))
            if found:
                return found
    return None


# A run's own files before its first save: the lock, the staging folder, the log (common/loop.LogHistory) and the
# trackers' logs (common/runtime.TRACKER_FOLDER).
_OURS_WHEN_EMPTY = {".lock", ".final.partial", ".log_history.jsonl", "runs"}


def check_output_dir(args, script, inputs=()):
    """Paths are sacred: `--output_dir` may be new, empty, or a run of this same script; it may never be (or
    hold, or sit inside) one of the run's inputs. A finished run is replaced only with --overwrite_output_dir,
    an unfinished one is continued with --resume_from_checkpoint or replaced with --overwrite_output_dir;
    anything else is refused, and nothing is read or written before these checks."""
    output = os.path.realpath(args.output_dir)
    if os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"--output_dir {args.output_dir} is a file, not a folder; choose a folder path.")
    for given in inputs:
        if not given or not os.path.exists(str(given)):
            continue  # hub ids and the built-in data
        source = os.path.realpath(str(given))
        if source == output or source.startswith(output + os.sep) or output.startswith(source + os.sep):
            raise UserError(
                f"--output_dir {args.output_dir} is, holds or sits inside the input {given}; writing there could "
                "destroy it. Choose an output folder outside every input."
            )
    if not os.path.isdir(output):
        return
    previous = _previous_script(output)
    finished = os.path.exists(os.path.join(output, "training_args.json"))
    if previous is None:
        if set(os.listdir(output)) - _OURS_WHEN_EMPTY:
            raise UserError(
                f"--output_dir {args.output_dir} is not empty and holds no run of {script}; choose a new or empty "
                "folder (nothing there was changed)."
            )
        return
    if previous != script:
        raise UserError(
            f"--output_dir {args.output_dir} holds a run of {previous}, not of {script}; choose another folder."
        )
    if finished and not args.overwrite_output_dir:
        raise UserError(
            f"{args.output_dir} already holds a finished run of {previous}; pass --overwrite_output_dir to replace "
            "it or choose another --output_dir."
        )
    if not finished and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        raise UserError(
            f"{args.output_dir} holds an unfinished run of {script}; continue it with --resume_from_checkpoint "
            "latest, or pass --overwrite_output_dir to start over."
        )


_HELD_LOCKS = {}


def lock_folder(folder, what):
    """Take `<folder>/.lock` for this process (the main one of a launch); a second writer is refused at once
    with a sentence instead of interleaving its files with the first's. Held until the process ends."""
    import fcntl

    if os.environ.get("RANK", "0") != "0":
        return
    folder = os.path.realpath(folder)
    if folder in _HELD_LOCKS:
        return
    os.makedirs(folder, exist_ok=True)
    handle = open(os.path.join(folder, ".lock"), "a+")  # noqa: SIM115 (held open: the lock lives with it)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(
            f"Another process is writing {what} {folder}; wait for it to finish or choose another folder."
        ) from None
    _HELD_LOCKS[folder] = handle


def unlock_folder(folder):
    handle = _HELD_LOCKS.pop(os.path.realpath(folder), None)
    if handle is not None:
        handle.close()


# ---------------------------------------------------------------------------- recorded config
SECRET_ARGS = {"hub_token"}


def public_config(args):
    """The whole config, less secrets: what checkpoints, run files and trackers record."""
    return {key: value for key, value in vars(args).items() if key not in SECRET_ARGS}


def tracker_config(args):
    """Config for trackers: scalars only, never the token."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in public_config(args).items()}


def tracker_init_kwargs(accelerator, run_name):
    """Per-tracker arguments of init_trackers: wandb writes its run folder (offline runs too: WANDB_MODE=offline)
    under <output_dir>/runs/<script>, where tensorboard writes its event files, instead of ./wandb."""
    logging_dir = accelerator.project_configuration.logging_dir
    if logging_dir is None:
        return {}
    folder = os.path.join(logging_dir, run_name)
    if accelerator.is_main_process:
        os.makedirs(folder, exist_ok=True)
    return {"wandb": {"dir": folder}}


def save_run_files(output_dir, args, script, results=None, log_history=None):
    """training_args.json (the whole config, less secrets), all_results.json and trainer_state.json (the
    logs of every optimiser step) next to the saved model."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as handle:
        json.dump({"script": script, **public_config(args)}, handle, indent=2, default=str)
    if results is not None:
        with open(os.path.join(output_dir, "all_results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    if log_history is not None:  # streamed entry by entry from the run's log file (see LogHistory)
        with open(os.path.join(output_dir, TRAINER_STATE), "w", encoding="utf-8") as handle:
            handle.write(f'{{\n  "script": {json.dumps(script)},\n  "log_history": [')
            for index, entry in enumerate(log_history):
                handle.write(("," if index else "") + "\n    " + json.dumps(entry))
            handle.write("\n  ]\n}\n")


def move_into_place(staging, folder, last):
    """Move every entry of `staging` into `folder` (replacing entries of the same name), `last` last, then
    remove the empty staging folder. A stale model file of an earlier run that the new save does not have
    (say, the head of a student that now has none) is removed first."""
    names = sorted(os.listdir(staging), key=lambda name: name == last)
    stale = {"2_Dense", "3_Normalize", "model.safetensors.index.json"} - set(names)
    for name in [*stale, last]:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)  # without the mark, the folder counts as unfinished until the move completes
    for name in names:
        target = os.path.join(folder, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)
