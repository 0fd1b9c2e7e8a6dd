"""Ranks started by hand the way ``torchrun`` starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in
the environment), for the scale-out tests: ``python tests/rank_scripts.py SCENARIO ARGS...``."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def watched_body(fail_rank: int, how: str) -> None:
    """Inside ``watched``: rank ``fail_rank`` fails (``how``) and stays alive, so only the watcher
    can tell the other rank, which waits in a barrier; ``how=none`` ends normally, rank 1 last;
    ``how=late``: rank ``fail_rank`` fails after the other has finished its work."""
    import torch.distributed as torch_dist

    from syntagen_st.scaleout.dist import current
    from syntagen_st.scaleout.watch import watched

    torch_dist.init_process_group("gloo")
    dist = current()
    try:
        with watched(dist, "prog", poll_s=0.1):
            if how in ("none", "late"):
                time.sleep(1.0 if dist.rank == 1 else 0)  # rank 0 reaches the end first
                if how == "late" and dist.rank == fail_rank:
                    raise OSError("[Errno 28] No space left on device")
            elif dist.rank == fail_rank and how == "raise":
                raise OSError("[Errno 28] No space left on device")
            elif dist.rank == fail_rank and how == "die":
                os._exit(9)  # no last word
            elif how == "die":
                time.sleep(30)
            else:
                dist.barrier()
    except OSError as err:
        print(f"raised {err}", flush=True)
        time.sleep(30)  # alive: gloo cannot tell the other rank
    print("returned", flush=True)


def blind_fit(argv: list[str]) -> None:
    """``fit`` where every rank but 0 is blind to the run folder's listings: the other ranks must
    take rank 0's reading (on a shared file system another node's listing may lag)."""
    if os.environ["RANK"] != "0":
        import syntagen_st.core.layout as layout
        import syntagen_st.core.store as store
        import syntagen_st.segmentation.trainer as train
        import syntagen_st.selftrain.pool as pool
        import syntagen_st.selftrain.runner as runner
        import syntagen_st.selftrain.steps as steps

        def blind(name):
            def refuse(*args, **kwargs):
                raise AssertionError(f"rank {os.environ['RANK']} read the run folder itself ({name})")
            return refuse

        # Patched where each lookup happens: every module that finds samples by itself.
        for module, name in ((pool, "find_samples"), (steps, "find_samples"), (train, "find_samples")):
            setattr(module, name, blind(name))
        layout.RunLayout.latest_samples = blind("RunLayout.latest_samples")
        store.Pool.rows = blind("Pool.rows")
        runner.RunState.done = blind("RunState.done")
        own_step = train.checkpoint_step  # a fold model's own checkpoint is this rank's to read

        def checkpoint_step(path):
            if "final" in Path(path).parts:
                blind("checkpoint_step of the final training")()
            return own_step(path)

        train.checkpoint_step = checkpoint_step
    from syntagen_st import fit
    from syntagen_st.core.cli import run_main

    run_main(fit.main, "syntagen_st.fit", argv)


if __name__ == "__main__":
    scenario, *rest = sys.argv[1:]
    if scenario == "watched":
        from syntagen_st.core.cli import run_main

        # As a command runs it: an error before the body (rank 0 gone already) is one line too.
        run_main(lambda _: watched_body(int(rest[0]), rest[1]), "prog", [])
    else:
        blind_fit(rest)
