"""Train the VQ tokenizer and the SigLIP encoder at the same time on a multi-core CPU.

The two trainers use extra threads unequally: a SigLIP step (small matmuls) gains less from a second thread
than a VQ step (convolutions), so neither fills two cores alone. The encoder trains in a spawned process on half
the threads while the VQ trains here on the other half, and the VQ takes every thread once the encoder is done;
if the VQ finishes first, the encoder takes every thread in the same way (timings: docs/).

The moment the trainer that finishes second changes its thread count depends on timing, and float sums differ
in the last bits between thread counts, so two side-by-side runs give its weights that differ in the last bits
(the one that finishes first keeps its half of the threads throughout and repeats exactly; in the demo that is
now the VQ). Train the tokenizers one after the other (the demo does with ``threads=1``) for bitwise-repeatable
runs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import torch

from unigen.training.tokenizer.siglip_trainer import SigLIPTrainConfig, train_siglip
from unigen.training.tokenizer.vq_trainer import VQTrainConfig, train_vq


def _siglip_worker(cfg: SigLIPTrainConfig, threads: int, all_threads: int, vq_done, report, max_steps) -> None:
    torch.set_num_threads(threads)
    parent = os.getppid()

    def take_all_threads() -> None:
        # a parent killed outright (SIGKILL) cannot stop this process; a resumed run would then train the encoder
        # in the same folder at the same time, so the encoder stops as soon as its parent is gone
        if os.getppid() != parent:
            os._exit(1)  # nobody is left to report to; a half-written checkpoint is a .tmp folder resume removes
        if vq_done.is_set() and torch.get_num_threads() != all_threads:
            torch.set_num_threads(all_threads)

    try:
        # the VQ's progress bar keeps line 0
        train_siglip(cfg, bar_position=1, before_step=take_all_threads, max_steps=max_steps)
    except BaseException:
        report.send(traceback.format_exc())
        raise SystemExit(1) from None  # the parent prints the traceback, once
    report.send(None)


def train_side_by_side(vq_cfg: VQTrainConfig, siglip_cfg: SigLIPTrainConfig, threads: int,
                       max_steps: int | None = None) -> float:
    """Train both (``threads`` >= 2 CPU threads in all; each stops at ``max_steps``, if given); returns the
    seconds the SigLIP encoder took."""
    if threads < 2:
        raise ValueError(f"training side by side needs threads >= 2, got {threads}; train one after the other")
    ctx = mp.get_context("spawn")  # not fork: a forked child would inherit this process's thread pools mid-use
    receive, send = ctx.Pipe(duplex=False)
    vq_done = ctx.Event()
    side = threads // 2
    proc = ctx.Process(target=_siglip_worker, args=(siglip_cfg, side, threads, vq_done, send, max_steps),
                       name="train-siglip")
    start = time.perf_counter()
    proc.start()
    send.close()  # this process keeps only the receiving end: EOF there means the worker is gone
    siglip_seconds, threads_before = None, torch.get_num_threads()

    def take_all_threads() -> None:
        nonlocal siglip_seconds
        if siglip_seconds is None and not proc.is_alive():
            siglip_seconds = time.perf_counter() - start
            torch.set_num_threads(threads)

    try:
        torch.set_num_threads(threads - side)
        train_vq(vq_cfg, before_step=take_all_threads, max_steps=max_steps)
        vq_done.set()  # the encoder, if still training, takes every thread from its next step
        try:
            error = receive.recv()  # None once it has saved the encoder; waits for it if it is still training
        except EOFError:
            proc.join()
            error = f"its process exited with code {proc.exitcode} before reporting (killed? out of memory?)"
        if error is not None:
            raise RuntimeError(f"training the SigLIP encoder (in a process beside the VQ trainer) failed:\n{error}")
        if siglip_seconds is None:
            siglip_seconds = time.perf_counter() - start
    finally:
        if proc.is_alive():
            proc.terminate()  # the VQ failed or was interrupted: do not leave the encoder training
        proc.join()
        torch.set_num_threads(threads_before)
    return siglip_seconds
