"""What ``fit`` reports while it trains: the history of per-epoch metrics, the progress bar and
notices for the user."""

from __future__ import annotations

import logging
import sys

from ._objective import evaluate

logger = logging.getLogger("softmax_jax")

History = dict[str, list]


def progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="epoch", dynamic_ncols=True)


def new_history(full_batch: bool) -> History:
    keys = ["epoch", "loss", "train_accuracy", "eval_loss", "eval_accuracy", "seconds"]
    return {key: [] for key in keys + (["grad_max"] if full_batch else [])}


def notice(message: str, progress: bool) -> None:
    """A line for the user: logged (logger ``softmax_jax``, INFO) and, with ``progress``, printed
    to stderr above the progress bar."""
    logger.info(message)
    if progress:
        print(message, file=sys.stderr, flush=True)


def record_epoch(plan, state, epoch, loss, acc, gmax, seconds, eval_dev) -> dict:
    record = {"epoch": epoch, "loss": loss, "train_accuracy": acc, "seconds": seconds}
    record["eval_loss"] = record["eval_accuracy"] = None
    if eval_dev is not None:
        el, ea = evaluate(plan.params(state), eval_dev)
        record["eval_loss"], record["eval_accuracy"] = float(el), float(ea)
    if plan.full_batch:
        record["grad_max"] = gmax
    return record


def update_bar(bar, record: dict, last: bool) -> None:
    """Advances the bar; after the last epoch without drawing it: ``close`` draws it, once."""
    if bar is None:
        return
    post = {"loss": f"{record['loss']:.4f}", "acc": f"{record['train_accuracy']:.3f}"}
    if record["eval_accuracy"] is not None:
        post["eval_acc"] = f"{record['eval_accuracy']:.3f}"
    bar.set_postfix(post, refresh=False)
    if last:
        bar.n += 1
    else:
        bar.update(1)
