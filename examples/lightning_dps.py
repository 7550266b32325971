"""DPS in PyTorch Lightning, in one process or under DDP.

    python examples/lightning_dps.py [--epochs 10] [--noise 0.2] [--out DIR]
    python examples/lightning_dps.py --ddp 2          # 2 CPU processes (gloo), DistributedDPSLoss

One process: ``self.crit = DPSLoss(...)`` is a submodule, so its bank (the buffer
``alpha``) is in ``state_dict()``. Lightning's checkpoints carry it, ``fit(ckpt_path=...)``
and ``load_from_checkpoint`` restore it, and Lightning's ``train()``/``eval()`` switching
also switches the bank between updating (training) and read-only (validation).

DDP (``--ddp N``): every rank must see one consistent bank, so the module builds
``dps_fast.distributed.DistributedDPSLoss(..., mode="replicated")`` in ``setup()``,
once Lightning has started the process group. Lightning's ``DistributedSampler``
pads each epoch by repeating samples; ``padding_mask`` marks the repeats so each
sample's belief is updated exactly once per epoch. The replicated bank is the same on
every rank; the checkpoint stores it without its per-rank layout tag, so any rank can
load it.
"""
import argparse
import json
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

import dps_fast
from dps_fast.datasets import WithIndex

from _digits import flip_auroc, mlp, noisy_digits


class LitDPS(pl.LightningModule):
    def __init__(self, labels: torch.Tensor, num_classes: int = 10, lr: float = 0.1, batch_size: int = 64,
                 ddp: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["labels"])
        self.labels = labels  # the training labels, in training-set order: the bank's prior
        self.net = mlp()
        self.crit = None if ddp else dps_fast.DPSLoss(labels, num_classes)

    def setup(self, stage: str) -> None:
        if self.hparams.ddp and self.crit is None:  # needs the process group: not in __init__
            from dps_fast.distributed import DistributedDPSLoss

            self.crit = DistributedDPSLoss(self.labels, self.hparams.num_classes, mode="replicated")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, index = batch  # WithIndex: index = positions in the training set
        logits = self(x)
        if not self.hparams.ddp:
            return self.crit(logits, index)
        from dps_fast.distributed import padding_mask

        positions = batch_idx * self.hparams.batch_size + torch.arange(len(index))  # in this rank's epoch
        valid = padding_mask(len(self.labels), self.trainer.world_size, self.global_rank, positions)
        return self.crit(logits, index, valid=valid)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.trainer.max_epochs)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.ddp:  # the whole bank, loadable on any rank (replicated mode)
            checkpoint["state_dict"]["crit.bank"] = self.crit.full_bank().cpu()
            checkpoint["state_dict"].pop("crit.bank_layout", None)


def bank_of(module: LitDPS) -> torch.Tensor:
    return module.crit.full_bank() if module.hparams.ddp else module.crit.alpha


def check_ddp_bank(module: LitDPS, epochs: int) -> dict:
    """Every rank holds the same bank, and every row got exactly one evidence per epoch
    (its mass is gamma^E * (c + (C-1) eps) + (1 - gamma^E) / (1 - gamma); docs/method.md)."""
    import torch.distributed as dist

    bank = module.crit.full_bank().double()
    sums = [None] * dist.get_world_size()
    dist.all_gather_object(sums, float(bank.sum()))
    g = module.crit.gamma
    expect = g ** epochs * (100.0 + 9 * 1e-2) + (1 - g ** epochs) / (1 - g)
    return {"ranks_agree": len(set(sums)) == 1,
            "each_sample_once_per_epoch": bool(torch.allclose(bank.sum(1), torch.full_like(bank[:, 0], expect),
                                                              rtol=1e-5))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--ddp", type=int, default=0, help="processes for DDP on CPU (0 = one process, no DDP)")
    p.add_argument("--out", default="runs/lightning-example", help="checkpoint folder")
    a = p.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    x, y, flipped, x_test, y_test = noisy_digits(a.noise)
    model = LitDPS(y, ddp=a.ddp > 0)
    loader = DataLoader(WithIndex(TensorDataset(x, y)), batch_size=model.hparams.batch_size, shuffle=True)
    ckpt = ModelCheckpoint(dirpath=a.out, save_last=True)
    trainer = pl.Trainer(max_epochs=a.epochs, accelerator="cpu", devices=max(1, a.ddp), logger=False,
                         strategy=DDPStrategy(process_group_backend="gloo") if a.ddp else "auto",
                         callbacks=[ckpt], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    report = check_ddp_bank(model, a.epochs) if a.ddp else {}
    if trainer.global_rank != 0:
        return
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    saved = torch.load(ckpt.last_model_path, map_location="cpu", weights_only=False)["state_dict"]
    bank_key = "crit.bank" if a.ddp else "crit.alpha"
    label_error = 1 - (bank_of(model) / bank_of(model).sum(1, keepdim=True)).gather(1, y[:, None])[:, 0]
    report.update(test_accuracy=acc, flip_auroc=flip_auroc(flipped, label_error),
                  checkpoint=ckpt.last_model_path, checkpoint_has_bank=bool(torch.equal(saved[bank_key],
                                                                                        bank_of(model).cpu())))
    if not a.ddp:  # a fresh module from the checkpoint has the trained bank
        restored = LitDPS.load_from_checkpoint(ckpt.last_model_path, labels=y)
        report["load_from_checkpoint_restores_bank"] = bool(torch.equal(restored.crit.alpha, model.crit.alpha))
    print(json.dumps(report))
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
