"""What a run keeps in output_dir, kept safe: one run at a time, complete checkpoints, nothing lost.

    with hold_output_dir(cfg.output_dir):        # a second run into the same folder is refused
        start = inspect_output_dir(cfg)            # what to resume from or replace; changes nothing
        ... load and check everything that can fail early (data, tokenizer, model, free disk) ...
        set_aside = start.make_room()              # only now: an earlier run moves to .replaced-run/
        ... train: its first complete checkpoint (or adapter) drops the earlier run;
            a failure before that puts the earlier run back ...

A checkpoint counts as complete only when every file in it is whole: trainer_state.json, which the
Trainer writes last, parses, and the adapter weights, optimizer, scheduler and RNG state are not
truncated. Everything here is standard library: importing it costs nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

LOCK_NAME = ".lock"
SET_ASIDE_NAME = ".replaced-run"  # an earlier run's files while --overwrite replaces them
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_PREFIX = "incomplete-"  # a skipped checkpoint is renamed so that nothing mistakes it for one
# Files a run writes at the top of output_dir (report.py, TensorBoard, and TRL's card of older runs).
RUN_OUTPUTS = ("metrics.json", "report.md", "loss_curve.png", "runs", "trainer_state.json")
RESUME_STATE_FILES = ("optimizer.pt", "scheduler.pt")
# The settings that fix the LoRA weights' shapes (or what they were trained on): a checkpoint
# cannot continue under other values.
SHAPE_SETTINGS = ("model_name", "lora_r", "lora_target_modules")


class OutputDirError(RuntimeError):
    """output_dir cannot be used as asked; the message says why and what to do."""


def is_main_process() -> bool:
    """Of the processes of one multi-GPU run (torchrun / accelerate launch set RANK), the one that
    holds output_dir and changes what is in it."""
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------- one run per output_dir

@contextmanager
def hold_output_dir(output_dir: str, printer=print):
    """Hold output_dir's lock for the whole run: a second run into the same folder is refused.

    The lock is an flock on output_dir/.lock, so the kernel releases it however the process ends
    (even kill -9); the file names the holder, for the message a second run prints. A lock file
    whose flock is free was left by a run that died: it is taken over, and that is said. A folder
    that this call created is removed again if the run left nothing in it.
    """
    out = Path(output_dir)
    if not is_main_process():  # the main process of this multi-GPU run holds it for all
        yield out
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(not_writable_message(out, exc)) from None
    fd = _acquire_lock(out / LOCK_NAME, printer)
    try:
        yield out
    finally:
        _release_lock(out / LOCK_NAME, fd)
        if created:
            try:
                out.rmdir()  # only succeeds when empty: nothing of the run is ever removed here
            except OSError:
                pass


def _acquire_lock(path: Path, printer) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputDirError(not_writable_message(path.parent, exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirError(in_use_message(path.parent, holder)) from None
        try:  # the holder we waited on may have released (unlinked) the file meanwhile: lock the new one
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _read_holder(fd)
    if stale:
        printer(f"output_dir: an earlier run (pid {stale.get('pid')}, started {stale.get('started')}) ended without "
                "releasing this folder (killed?); its lock is stale and was taken over")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return fd


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (ValueError, OSError):
        return {"pid": "unknown"}


def _release_lock(path: Path, fd: int) -> None:
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def in_use_message(out: Path, holder: dict) -> str:
    return (f"{out} is in use by another run (pid {holder.get('pid')} on {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}: {holder.get('command', '?')}); two runs in one output_dir would mix their "
            "checkpoints, adapter and report. Wait for it to finish or stop it, or pick another --output_dir")


def not_writable_message(out: Path, exc: OSError) -> str:
    return (f"cannot write to output_dir {out} ({exc.strerror or exc}); pick a folder you can write to with "
            "--output_dir, or fix its permissions")


# ---------------------------------------------------------------------------- complete checkpoints

def checkpoints_in(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders, oldest step first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    return int(CHECKPOINT_RE.match(folder.name).group(1))


def checkpoint_problem(folder: Path) -> str | None:
    """What is broken in a checkpoint folder, or None when it is completely written."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "it has no trainer_state.json (the save did not finish)"
    # run_config.json (the run's settings, which resume checks against) may be absent in a checkpoint
    # written before it was recorded; present, it must be whole.
    optional = [name for name in ("run_config.json",) if (folder / name).exists()]
    for name in ("trainer_state.json", "adapter_config.json", *optional):
        problem = json_problem(folder / name)
        if problem:
            return problem
    problem = safetensors_problem(folder / "adapter_model.safetensors")
    if problem:
        return problem
    archives = {folder / name for name in RESUME_STATE_FILES}
    archives |= {p for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin")}
    for path in sorted(archives):
        problem = archive_problem(path)
        if problem:
            return problem
    return None


def json_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"it has no {path.name}"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} is truncated or not valid JSON"
    return None


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file is whole when its size is 8 + header + the end of its last tensor."""
    if not path.is_file():
        return f"it has no {path.name}"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size)) if 0 < header_size <= size else None
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        return f"{path.name} is truncated or corrupt (its header does not parse)"
    expected = 8 + header_size + end
    if size != expected:
        return f"{path.name} is truncated ({size:,} of {expected:,} bytes)"
    return None


def archive_problem(path: Path) -> str | None:
    """torch.save writes a zip archive, whose directory is at its very end: a cut file has none."""
    if not path.is_file():
        return f"it has no {path.name}"
    try:
        with zipfile.ZipFile(path):
            pass
    except (zipfile.BadZipFile, OSError):
        return f"{path.name} is truncated or corrupt"
    return None


def describe_checkpoints(output_dir: str | Path) -> str:
    complete = [p.name for p in checkpoints_in(output_dir) if checkpoint_problem(p) is None]
    return f"complete checkpoints in {output_dir}: {', '.join(complete)}" if complete else f"no complete checkpoint in {output_dir}"


def resume_checkpoint(cfg) -> tuple[Path, dict[Path, str]]:
    """(checkpoint to resume from, {incomplete checkpoint skipped: what is broken})."""
    out = Path(cfg.output_dir)
    if cfg.resume != "latest":
        folder = Path(cfg.resume)
        if not folder.is_dir():
            raise OutputDirError(f"--resume {cfg.resume}: no such folder; {describe_checkpoints(out)} "
                                 "(--resume latest picks the newest)")
        problem = checkpoint_problem(folder)
        if problem:
            raise OutputDirError(f"--resume {cfg.resume}: this checkpoint is incomplete: {problem}. "
                                 f"{describe_checkpoints(out).capitalize()} (--resume latest picks the newest)")
        return folder, {}
    found = checkpoints_in(out)
    if not found:
        raise OutputDirError(f"--resume latest: no checkpoint-* folder in {out}; start a fresh run without --resume")
    broken = {}
    for folder in reversed(found):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, broken
        broken[folder] = problem
    listed = "; ".join(f"{p.name}: {why}" for p, why in broken.items())
    raise OutputDirError(f"--resume latest: no checkpoint in {out} is complete ({listed}); start a fresh run "
                         "with --overwrite, or pick another --output_dir")


def shape_changes(checkpoint: Path, cfg) -> list[str]:
    """Each setting in SHAPE_SETTINGS on which this run and the checkpoint differ, as 'name: was -> now'."""
    adapter = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    targets = adapter.get("target_modules") or []
    trained = {"lora_r": adapter.get("r"), "lora_target_modules": sorted([targets] if isinstance(targets, str) else targets)}
    run_config = checkpoint / "run_config.json"
    if run_config.is_file():
        trained["model_name"] = json.loads(run_config.read_text(encoding="utf-8")).get("model_name")
    now = {"model_name": cfg.model_name, "lora_r": cfg.lora_r, "lora_target_modules": sorted(cfg.lora_target_modules)}
    if now["lora_target_modules"] == ["auto"]:  # resolved from the same base, so the same layers as the checkpoint's
        del now["lora_target_modules"]
    return [f"{name}={trained[name]!r} in the checkpoint, {now[name]!r} now" for name in SHAPE_SETTINGS
            if name in trained and name in now and trained[name] != now[name]]


# ---------------------------------------------------------------------------- what a new run meets

@dataclass
class RunStart:
    """What output_dir holds for this run: the checkpoint to resume, and what to move out of the way."""
    output_dir: Path
    checkpoint: Path | None = None
    replace: list[str] = field(default_factory=list)  # an earlier run's files (--overwrite)
    incomplete: list[Path] = field(default_factory=list)  # broken checkpoints, renamed aside before training

    @contextmanager
    def replacing(self, printer=print):
        """Move the earlier run and the broken checkpoints out of the way (enter it only once every
        check has passed); yields the SetAside, which the first complete checkpoint drops. If the
        block fails before that, the earlier run is put back; if it ends well, it is dropped."""
        earlier = self.make_room(printer)
        try:
            yield earlier
        except BaseException:
            earlier.put_back()
            raise
        earlier.drop()

    def make_room(self, printer=print) -> "SetAside":
        if not is_main_process():
            return SetAside(self.output_dir, [])
        for folder in self.incomplete:
            target = unused_name(folder.with_name(INCOMPLETE_PREFIX + folder.name))
            os.replace(folder, target)
            printer(f"output_dir: renamed the incomplete {folder.name} to {target.name} (delete it when you like)")
        return set_aside(self.output_dir, self.replace)

    def check_disk(self, trainable_params: int, save_steps: int, save_total_limit: int) -> None:
        """Refuse a run whose checkpoints and adapter cannot fit, before anything is written or removed."""
        need = run_disk_bytes(trainable_params, save_total_limit if save_steps > 0 else 0)
        check_free_disk(self.output_dir, need, folder_bytes([self.output_dir / n for n in self.replace]), save_total_limit)


def inspect_output_dir(cfg, printer=print) -> RunStart:
    """Check output_dir for this run and say what it will continue or replace; changes nothing.

    A run never replaces an earlier run's files unless --overwrite is given; --resume continues one.
    """
    out = Path(cfg.output_dir)
    check_adapter_name(cfg.new_model)
    if cfg.resume:
        adapter = out / cfg.new_model
        if adapter.exists() and not is_adapter_folder(adapter):
            raise OutputDirError(f"{adapter} exists and is not an adapter folder written by a run, so the adapter would "
                                 "not be saved there; pick another --new_model (or move that folder)")
        checkpoint, broken = resume_checkpoint(cfg)
        for folder, why in broken.items():
            printer(f"--resume latest: skipped {folder.name}, which is incomplete: {why}")
        check_no_newer_checkpoints(checkpoint, out, set(broken))
        changed = shape_changes(checkpoint, cfg)
        if changed:
            raise OutputDirError(
                f"--resume: {checkpoint.name} cannot continue with these settings, which change the LoRA weights' "
                f"shapes or base: {'; '.join(changed)}. Resume with the checkpoint's values, or start a new run "
                "in another --output_dir")
        return RunStart(out, checkpoint, incomplete=list(broken))
    existing = earlier_run_files(out, cfg.new_model)
    if existing and not cfg.overwrite:
        raise OutputDirError(
            f"{out} already holds a run ({', '.join(existing[:6])}); nothing was changed. "
            "Continue it with --resume latest, replace it with --overwrite, or pick another --output_dir")
    return RunStart(out, replace=existing)


def check_adapter_name(name: str) -> None:
    """The adapter folder may not take the name of a file the run writes itself (config.py has
    already refused names that are not a plain folder name)."""
    if CHECKPOINT_RE.match(name) or name.startswith(INCOMPLETE_PREFIX) or name in RUN_OUTPUTS or name == "README.md":
        raise OutputDirError(f"new_model={name!r} is the name of a file the run itself writes in output_dir; "
                             "pick another --new_model, e.g. my-adapter")


def check_no_newer_checkpoints(checkpoint: Path, out: Path, ignored: set[Path]) -> None:
    if checkpoint.resolve().parent != out.resolve():
        return
    newer = [p.name for p in checkpoints_in(out) if checkpoint_step(p) > checkpoint_step(checkpoint) and p not in ignored]
    if newer:
        raise OutputDirError(f"--resume {checkpoint}: {', '.join(newer)} in {out} are newer; continuing from "
                             f"{checkpoint.name} would overwrite them. Move them out of {out} first (nothing was changed)")


def is_adapter_folder(path: Path) -> bool:
    """A folder that training.save_adapter wrote (the only kind a save may replace)."""
    return path.is_dir() and (path / "adapter_config.json").is_file() and (path / "run_config.json").is_file()


def is_trl_model_card(path: Path) -> bool:
    try:
        return path.name == "README.md" and "generated_from_trainer" in path.read_text(encoding="utf-8")[:2000]
    except (OSError, UnicodeDecodeError):
        return False


def earlier_run_files(out: Path, adapter_name: str) -> list[str]:
    """What in output_dir belongs to an earlier run; a user's own files are never listed (nor touched)."""
    if not out.is_dir():
        return []
    found = []
    for path in sorted(out.iterdir(), key=lambda p: p.name):
        name = path.name
        if (CHECKPOINT_RE.match(name) or name.startswith(INCOMPLETE_PREFIX) or name in RUN_OUTPUTS
                or name == adapter_name or is_adapter_folder(path) or is_trl_model_card(path)):
            found.append(name)
    return found


def unused_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


# ---------------------------------------------------------------------------- replacing an earlier run

@dataclass
class SetAside:
    """An earlier run's files, moved into output_dir/.replaced-run while a new run replaces them.

    They are dropped as soon as the new run has written something to take their place (its first
    complete checkpoint, or its adapter), and put back if it fails before that.
    """
    output_dir: Path
    names: list[str]

    @property
    def folder(self) -> Path:
        return self.output_dir / SET_ASIDE_NAME

    def drop(self) -> None:
        if self.names:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.names = []

    def put_back(self) -> None:
        for name in self.names:
            here = self.output_dir / name
            if here.is_dir():
                shutil.rmtree(here)  # the failed new run's own partial file (e.g. a fresh runs/)
            elif here.exists():
                here.unlink()
            os.replace(self.folder / name, here)
        if self.names:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.names = []


def set_aside(output_dir: Path, names: list[str]) -> SetAside:
    if names:
        folder = output_dir / SET_ASIDE_NAME
        folder.mkdir(exist_ok=True)
        for name in names:
            os.replace(output_dir / name, folder / name)
    return SetAside(output_dir, list(names))


def recover_interrupted_replace(output_dir: str | Path, printer=print) -> None:
    """A run killed while replacing an earlier one left it in .replaced-run: put it back if the new run
    wrote nothing to replace it with, else drop it. Likewise an adapter left mid-rename."""
    out = Path(output_dir)
    folder = out / SET_ASIDE_NAME
    if not is_main_process():
        return
    if folder.is_dir():
        names = sorted(p.name for p in folder.iterdir())
        new_run_wrote = any(checkpoint_problem(p) is None for p in checkpoints_in(out)) or any(
            is_adapter_folder(p) for p in out.iterdir() if not p.name.startswith("."))
        pending = SetAside(out, names)
        if new_run_wrote:
            pending.drop()
            printer(f"output_dir: dropped {SET_ASIDE_NAME}/ (an earlier run that a later --overwrite run replaced)")
        else:
            pending.put_back()
            printer(f"output_dir: an --overwrite run was killed before it had saved anything; put the run it was "
                    f"replacing back ({', '.join(names)})")
    for previous in out.glob(".*.previous"):
        target = out / previous.name[1:-len(".previous")]
        if not target.exists() and is_adapter_folder(previous):
            os.replace(previous, target)
            printer(f"output_dir: restored the adapter {target.name} that an interrupted save had moved aside")


# ---------------------------------------------------------------------------- saving and disk space

def check_save_target(target: Path, output_dir: str | Path) -> None:
    """Only a folder directly inside output_dir that a save wrote before may be replaced: never
    output_dir itself, never a folder elsewhere, never a user's folder."""
    if target.resolve().parent != Path(output_dir).resolve() or target.name.startswith("."):
        raise OutputDirError(f"refusing to save to {target}: an adapter is saved only as a folder directly inside "
                             f"output_dir ({output_dir}); check --new_model")
    if target.exists() and not is_adapter_folder(target):
        raise OutputDirError(f"refusing to replace {target}: it is not an adapter folder written by a run; "
                             "pick another --new_model")


def replace_folder(staging: Path, target: Path, output_dir: str | Path) -> Path:
    """Put the completely written `staging` folder at `target` (check_save_target's rules)."""
    check_save_target(target, output_dir)
    previous = target.with_name(f".{target.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)  # same folder, so a rename: never half done
    shutil.rmtree(previous, ignore_errors=True)
    return target


def free_bytes(path: str | Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def folder_bytes(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files)
    return total


def run_disk_bytes(trainable_params: int, checkpoints_kept: int, optimizer_bytes_per_param: int = 8) -> dict:
    """What a run writes, estimated: each checkpoint holds the float32 LoRA weights and the optimizer
    state (AdamW: two float32 moments per weight) plus the tokenizer; the Trainer writes a new
    checkpoint before it deletes the oldest, and a save keeps the old adapter until the new one is whole."""
    adapter = 4 * trainable_params + 16 * 2**20  # + tokenizer and configs
    checkpoint = adapter + optimizer_bytes_per_param * trainable_params
    return {"checkpoint": checkpoint, "adapter": adapter,
            "total": (checkpoints_kept + 1) * checkpoint + 2 * adapter + 32 * 2**20}  # + report and logs


def check_free_disk(output_dir: str | Path, need: dict, reclaimable: int, save_total_limit: int) -> None:
    """Refuse a run whose checkpoints and adapter cannot fit, before anything is written or removed."""
    free = free_bytes(output_dir)
    if free + reclaimable < need["total"]:
        mib = 2**20
        raise OutputDirError(
            f"the disk holding {output_dir} has {free / mib:,.0f} MiB free"
            + (f" (+{reclaimable / mib:,.0f} MiB of the run being replaced)" if reclaimable else "")
            + f", and this run writes about {need['total'] / mib:,.0f} MiB (checkpoints of "
            f"{need['checkpoint'] / mib:,.0f} MiB, save_total_limit={save_total_limit}, and the adapter); nothing was "
            "changed. Free some space, lower --save_total_limit, or pick another --output_dir")


def save_failed_message(what: str, folder: Path, exc: BaseException, kept: str) -> str:
    """A save that failed (full disk, quota, I/O error): what broke, how much room is left, what is safe."""
    try:
        room = f"; the disk holding it has {free_bytes(folder) / 2**20:,.1f} MiB free"
    except OSError:
        room = ""
    return (f"could not write {what} {folder} ({type(exc).__name__}: {exc}){room}. {kept} "
            "Free some space (or lower --save_total_limit, or pick another --output_dir), then resume with "
            "--resume latest and the same settings")
