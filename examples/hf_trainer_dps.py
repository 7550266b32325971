"""DPS with the Hugging Face ``Trainer``: a ``compute_loss`` override.

    python examples/hf_trainer_dps.py [--epochs 10] [--noise 0.2] [--out DIR]

The dataset yields dicts ``{"pixel_values", "labels"}``; ``WithIndex`` adds an
``"index"`` key, each sample's position in the training set. The Trainer drops every
column the model's ``forward`` does not name (with a ``datasets.Dataset`` and with a
plain torch dataset alike), so ``remove_unused_columns=False`` keeps ``index`` (and
``labels``) for ``compute_loss``. ``DPSLoss`` is a submodule of the model: the Trainer
moves it to the device, saves its bank with every checkpoint (and
``resume_from_checkpoint`` restores it), and its ``train()``/``eval()`` switching makes
the bank read-only during evaluation, where the loss is plain cross-entropy.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import dps_fast
from dps_fast.datasets import WithIndex

from _digits import flip_auroc, mlp, noisy_digits


class Images(Dataset):
    """A dict-style dataset, as Hugging Face pipelines produce."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class DPSClassifier(torch.nn.Module):
    def __init__(self, labels: torch.Tensor, num_classes: int = 10):
        super().__init__()
        self.net = mlp()
        self.dps = dps_fast.DPSLoss(labels, num_classes)  # the bank: part of the model's state_dict

    def forward(self, pixel_values):
        return self.net(pixel_values)


class DPSTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)  # the Trainer reads labels from inputs later: do not mutate them
        index, labels = inputs.pop("index"), inputs.pop("labels")
        logits = model(**inputs)
        core = getattr(model, "module", model)  # unwrapped (DataParallel/DDP wrap the model)
        loss = core.dps(logits, index) if model.training else F.cross_entropy(logits, labels)
        return (loss, {"logits": logits}) if return_outputs else loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--out", default="runs/hf-example", help="the Trainer's output_dir (checkpoints)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    x, y, flipped, x_test, y_test = noisy_digits(a.noise)
    model = DPSClassifier(y)
    args = TrainingArguments(output_dir=a.out, num_train_epochs=a.epochs, per_device_train_batch_size=64,
                             per_device_eval_batch_size=256, lr_scheduler_type="cosine", warmup_steps=0,
                             remove_unused_columns=False, label_names=["labels"],
                             save_strategy="epoch", save_total_limit=1, eval_strategy="epoch", logging_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # the Trainer adds the cosine schedule
    trainer = DPSTrainer(model=model, args=args, train_dataset=WithIndex(Images(x, y)),
                         eval_dataset=WithIndex(Images(x_test, y_test)), optimizers=(opt, None))
    trainer.train()
    bank_before_eval = model.dps.alpha.clone()
    metrics = trainer.evaluate()  # eval mode: the bank is read, not updated
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    last = max((d for d in os.listdir(a.out) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    from safetensors.torch import load_file

    saved = load_file(os.path.join(a.out, last, "model.safetensors"))
    report = {"test_accuracy": acc, "eval_loss": metrics["eval_loss"],
              "flip_auroc": flip_auroc(flipped, model.dps.posterior()["label_error"]),
              "bank_unchanged_by_eval": bool(torch.equal(bank_before_eval, model.dps.alpha)),
              "checkpoint_has_bank": bool(torch.equal(saved["dps.alpha"], model.dps.alpha))}
    print(json.dumps(report))
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
