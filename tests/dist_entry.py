"""`torchrun tests/dist_entry.py {rl,sft} ARGS`: a stage script as torchrun's worker, with a watchdog
that prints every thread's stack and exits when the run takes longer than $WATCHDOG_S seconds, so a
hang in a multi-process test fails with the place it hangs instead of a bare timeout. For rl.py the
reward is a deterministic function of the sampled tokens (an untrained model never answers), so
that multi-process tests exercise real updates."""
import faulthandler
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rl  # noqa: E402
import sft  # noqa: E402


def token_reward(traj, *args):
    return (sum(traj.token_ids) % 7) / 7


if __name__ == "__main__":
    faulthandler.dump_traceback_later(float(os.environ.get("WATCHDOG_S", "240")), exit=True)
    stage, argv = sys.argv[1], sys.argv[2:]
    if stage == "rl":
        rl.reward = token_reward
    {"rl": rl.main, "sft": sft.main}[stage](argv)
