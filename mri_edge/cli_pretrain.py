"""`mri-edge pretrain` (registered on the `mri-edge` group by cli.py)."""

from __future__ import annotations

import click

from .clitools import OUT_DIR, TASK_CHOICE, config_from, echo, options_from, run_guarded
from .config import PretrainConfig
from .run import RunFolder


@click.command()
@click.option("--task", type=TASK_CHOICE, required=True,
              help="Built-in task, or custom (classes from folders).")
@click.option("--data-dir", type=click.Path(), required=True,
              help="Folder with Training/[Validation/]Testing class folders (any common spelling; only training "
                   "images are trained on).")
@click.option("--out", type=OUT_DIR, required=True, help="The pretrain folder (new or empty).")
@click.option("--force", is_flag=True, help="Write into an --out folder that holds other files.")
@options_from(PretrainConfig)
def pretrain(task, data_dir, out, force, **kw):
    """Self-supervised pretraining (SimCLR) of DenseNet121 on the training split, no labels.

    Writes OUT/encoder.keras for `mri-edge train --weights OUT/encoder.keras`. The images that
    train will hold out (same --val-split, --val-fraction, --seed, --group-threshold) are never
    trained on, only probed: a k-NN vote of the training labels says whether the features
    improved for them; the test split is not decoded (docs/how-it-works.md).

    \b
    Example:
      mri-edge pretrain --task alzheimer --data-dir ../shared/data/alzheimer-mri --val-split grouped \\
          --weights artifacts/tumor-64px/model.keras --image-size 64 --time-budget 20 --out artifacts/runs/ssl
    """
    from . import pretrain as pretrain_lib  # noqa: PLC0415

    cfg = config_from(PretrainConfig, kw, task=task, data_dir=str(data_dir), out=str(out))
    r = run_guarded(pretrain_lib.pretrain, cfg, log=echo, force=force)
    click.echo(f"held-out k-NN probe {r['before']['nn1']:.2%} -> {r['after']['nn1']:.2%} (1-NN) in {r['epochs']} "
               f"epochs ({out})")
    click.echo(f"next: mri-edge train --task {task} --data-dir {data_dir} --weights {RunFolder(out).encoder_path} "
               f"{pretrain_lib.train_options(cfg)} ...")
