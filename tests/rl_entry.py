"""`torchrun tests/rl_entry.py ARGS`: rl.py with a reward that needs no trained model (a
deterministic function of the sampled tokens), so that multi-process tests exercise real updates."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rl  # noqa: E402


def token_reward(traj, *args):
    return (sum(traj.token_ids) % 7) / 7


if __name__ == "__main__":
    rl.reward = token_reward
    rl.main(sys.argv[1:])
