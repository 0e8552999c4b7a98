"""DeepSpeed checkpoints of a run: layout and markers, saving and pruning, the resume choice, universal conversion.

- :mod:`.layout`: tag folders ``step-<N>``, the ``COMPLETE`` and ``UNIVERSAL`` markers, model-states files, the saved
  client state, and resolving what a user names;
- :mod:`.integrity`: is a complete-looking checkpoint whole (a listing against the marker's record);
- :mod:`.writes` and :mod:`.store`: the collective save (fsynced, every file recorded, a failed write reported on
  every rank), pruning, and moving checkpoints aside (abandoned, corrupt, an earlier run's);
- :mod:`.compare`: the saved config against this run's;
- :mod:`.resume`: rank 0's resume decision, broadcast to every rank;
- :mod:`.universal`: DeepSpeed's universal format, for a resume at another world size.

The trainer and the conversion tool both use it; the run lock of an output directory is :mod:`pretrain.runlock`.
"""

from .compare import ARCHITECTURE_KEYS, ConfigDiff, compare_configs
from .config import CheckpointConfig
from .integrity import checkpoint_bytes, find_corrupt_file, find_damage, list_files, reading
from .layout import (
    ABANDONED_DIR,
    CORRUPT_DIR,
    MARKER,
    UNIVERSAL,
    CheckpointError,
    expected_rank_files,
    find_latest_complete,
    has_zero_shards,
    is_complete,
    is_tag_dir,
    is_universal,
    list_complete,
    model_states_file,
    read_client_state,
    read_marker,
    resolve_checkpoint,
    step_dirs,
    step_of,
    tag_for,
    universal_dir,
)
from .resume import ResumePoint, needs_universal, plan_resume, resume_target
from .store import (
    BEST_RECORD,
    PREVIOUS_RUNS_DIR,
    RUN_OUTPUTS,
    mark_best,
    move_to_corrupt,
    read_best,
    remove_cut_short,
    save_checkpoint,
    set_aside_later,
    set_aside_previous_run,
)
from .universal import to_universal

__all__ = [
    "ABANDONED_DIR",
    "ARCHITECTURE_KEYS",
    "BEST_RECORD",
    "CORRUPT_DIR",
    "MARKER",
    "PREVIOUS_RUNS_DIR",
    "RUN_OUTPUTS",
    "UNIVERSAL",
    "CheckpointConfig",
    "CheckpointError",
    "ConfigDiff",
    "ResumePoint",
    "checkpoint_bytes",
    "compare_configs",
    "expected_rank_files",
    "find_corrupt_file",
    "find_damage",
    "find_latest_complete",
    "has_zero_shards",
    "is_complete",
    "is_tag_dir",
    "is_universal",
    "list_complete",
    "list_files",
    "mark_best",
    "model_states_file",
    "move_to_corrupt",
    "needs_universal",
    "plan_resume",
    "read_best",
    "read_client_state",
    "read_marker",
    "reading",
    "remove_cut_short",
    "resolve_checkpoint",
    "resume_target",
    "save_checkpoint",
    "set_aside_later",
    "set_aside_previous_run",
    "step_dirs",
    "step_of",
    "tag_for",
    "to_universal",
    "universal_dir",
]
