"""Training methods as loss plug-ins, all on the fused ops of the public API.

- ``ce``: cross-entropy with the (possibly noisy) labels.
- ``ls``: label smoothing, targets (1 - e) onehot + e / C.
- ``pskd``: Progressive Self-Knowledge Distillation (Kim et al. 2021): targets
  (1 - a_t) onehot + a_t * p_prev, with p_prev the sample's prediction of the last
  epoch and a_t = alpha_T * t / T (alpha_T = 0.8).
- ``te``: temporal ensembling targets: an EMA Z of each sample's predictions
  (momentum beta = 0.6, bias-corrected); targets (1 - w_t) onehot + w_t * Z, with
  w_t ramping linearly to w_max = 0.5 over the first 30% of epochs.
- ``dps``: Deep Probabilistic Supervision (DPSLoss).
- ``dps+con``: DPS plus SupCon over two views with a projection head; positives
  from the posterior (``--con-positives hard|soft|views``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional
from ..loss import DPSLoss

METHODS = ("ce", "ls", "pskd", "te", "dps", "dps+con")


class Method:
    name = "base"
    views = 1
    needs_features = False
    distributed_bank = False  # True when the bank is a DistributedDPSLoss (saved per rank)

    def __init__(self, labels: torch.Tensor, num_classes: int, epochs: int, cfg: dict, device):
        self.labels = labels.to(device)
        self.num_classes, self.epochs, self.cfg, self.device = num_classes, epochs, cfg, device
        self.backend = cfg.get("backend")
        self.epoch = 0

    def onehot(self, y):
        return F.one_hot(y, self.num_classes).float()

    def loss(self, logits, index, y, features=None, valid=None):
        raise NotImplementedError

    def start_epoch(self, epoch: int):
        self.epoch = epoch

    def end_epoch(self):
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass

    def scalar_state(self) -> dict:
        """Numbers a checkpoint keeps beside the bank, whatever the bank kind (a distributed
        bank is saved per rank, outside ``state_dict``)."""
        return {}

    def load_scalar_state(self, state: dict):
        pass

    def epoch_info(self) -> dict:
        """Extra columns of this epoch's metrics row."""
        return {}


class CE(Method):
    name = "ce"

    def loss(self, logits, index, y, features=None, valid=None):
        return functional.soft_cross_entropy(logits, self.onehot(y), backend=self.backend)


class LabelSmoothing(Method):
    name = "ls"

    def loss(self, logits, index, y, features=None, valid=None):
        e = self.cfg.get("ls_eps", 0.1)
        t = self.onehot(y) * (1 - e) + e / self.num_classes
        return functional.soft_cross_entropy(logits, t, backend=self.backend)


class _BankMethod(Method):
    """Keeps a per-sample prediction bank [N, C] (float32)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        if self.cfg.get("world", 1) > 1:
            raise ValueError(f"method {self.name!r} keeps a per-sample bank that is not distributed; "
                             f"with --nproc > 1 use ce, ls, dps or dps+con")
        n = self.labels.numel()
        self.bank = F.one_hot(self.labels, self.num_classes).float()
        self.seen = torch.zeros(n, dtype=torch.bool, device=self.device)

    def state_dict(self):
        return {"bank": self.bank, "seen": self.seen}

    def load_state_dict(self, state):
        self.bank.copy_(state["bank"])
        self.seen.copy_(state["seen"])


class PSKD(_BankMethod):
    name = "pskd"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.next_bank = self.bank.clone()

    def loss(self, logits, index, y, features=None, valid=None):
        a_t = self.cfg.get("pskd_alpha", 0.8) * (self.epoch + 1) / self.epochs
        with torch.no_grad():
            prev = self.bank[index]
            self.next_bank[index] = torch.softmax(logits.detach().float(), -1)
        t = (1 - a_t) * self.onehot(y) + a_t * prev
        return functional.soft_cross_entropy(logits, t, backend=self.backend)

    def end_epoch(self):
        self.bank.copy_(self.next_bank)

    def state_dict(self):
        return {"bank": self.bank, "next_bank": self.next_bank, "seen": self.seen}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.next_bank.copy_(state["next_bank"])


class TemporalEnsembling(_BankMethod):
    name = "te"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.bank.zero_()
        self.steps = torch.zeros(self.labels.numel(), device=self.device)

    def loss(self, logits, index, y, features=None, valid=None):
        beta = self.cfg.get("te_beta", 0.6)
        ramp = max(1.0, 0.3 * self.epochs)
        w = self.cfg.get("te_weight", 0.5) * min(1.0, self.epoch / ramp)
        with torch.no_grad():
            p = torch.softmax(logits.detach().float(), -1)
            z = self.bank[index] * beta + (1 - beta) * p
            self.bank[index] = z
            self.steps[index] += 1
            zhat = z / (1 - beta ** self.steps[index])[:, None]
            zhat = zhat / zhat.sum(1, keepdim=True)
        t = (1 - w) * self.onehot(y) + w * zhat
        return functional.soft_cross_entropy(logits, t, backend=self.backend)

    def state_dict(self):
        return {"bank": self.bank, "seen": self.seen, "steps": self.steps}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.steps.copy_(state["steps"])


class DPS(Method):
    name = "dps"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        c = self.cfg
        self.dps = DPSLoss(self.labels, self.num_classes, c=c.get("c", 100.0), eps=c.get("eps", 1e-2),
                           gamma=c.get("gamma", 0.95), tau_e=c.get("tau_e", 1.0),
                           bank_dtype=getattr(torch, c.get("bank_dtype", "float32")), backend=self.backend,
                           device=self.device, bank=self._bank_kind(),
                           contrastive_weight=c.get("con_weight", 0.5) if self.needs_features else 0.0,
                           con_tau=c.get("con_tau", 0.1), con_positives=c.get("con_positives", "hard"),
                           top_k=c.get("top_k", 0) or None)
        self.distributed_bank = self.dps.bank_kind in ("replicated", "sharded")
        self.adapt_k = c.get("tau_e_adapt", 0.0)
        self.adapted_epoch = -1  # the epoch whose tau_e has been set; kept in checkpoints

    def start_epoch(self, epoch: int):
        """With --tau-e-adapt K, sets tau_e from the bank once per epoch (docs/results.md section 5).
        A run resumed mid-epoch keeps the tau_e its epoch started with (loaded from the
        checkpoint), so the resumed run equals the uninterrupted one."""
        super().start_epoch(epoch)
        if self.adapt_k > 0 and self.adapted_epoch != epoch:
            self.dps.adapt_tau_e(k=self.adapt_k)
            self.adapted_epoch = epoch

    def scalar_state(self) -> dict:
        """On every rank (tau_e="auto" sums its pass's statistic over the ranks)."""
        return {"tau_e": self.dps.tau_e, "adapted_epoch": self.adapted_epoch,
                "tau_e_auto": self.dps.tau_e_state().tolist()}

    def load_scalar_state(self, state: dict):
        if state:
            self.dps.tau_e, self.adapted_epoch = state["tau_e"], state["adapted_epoch"]
            self.dps.load_tau_e_state(torch.tensor(state.get("tau_e_auto", []), dtype=torch.float64))

    def epoch_info(self) -> dict:
        info = {"tau_e": self.dps.tau_e} if self.adapt_k > 0 or self.dps.auto_tau_e is not None else {}
        if self.cfg.get("top_k", 0):  # how far the top-k targets may be from a dense bank's (method §12)
            err = self.dps.topk_error()
            info.update(topk_mean_tv_bound=err["mean_tv_bound"], topk_max_tv_bound=err["max_tv_bound"])
        return info

    def _bank_kind(self) -> str:
        bank, world = self.cfg.get("bank", "auto"), self.cfg.get("world", 1)
        if world > 1 and bank in ("local", "host"):
            raise ValueError(f"--bank {bank} is a single-process option; with --nproc > 1 use auto, replicated "
                             f"or sharded")
        if world == 1 and bank in ("replicated", "sharded"):
            raise ValueError(f"--bank {bank} needs --nproc > 1")
        return "local" if (world == 1 and bank == "auto") else bank

    def loss(self, logits, index, y, features=None, valid=None):
        return self.dps(logits, index, features, valid=valid)

    def state_dict(self):
        return self.dps.state_dict()

    def load_state_dict(self, state):
        self.dps.load_state_dict(state)

    def save_bank(self, folder: str) -> None:
        from ..distributed import save_bank

        save_bank(self.dps, folder)

    def load_bank(self, folder: str) -> None:
        from ..distributed import load_bank

        load_bank(self.dps, folder)


class DPSCon(DPS):
    name = "dps+con"
    views = 2
    needs_features = True


_REGISTRY = {m.name: m for m in (CE, LabelSmoothing, PSKD, TemporalEnsembling, DPS, DPSCon)}


def build_method(name: str, labels, num_classes: int, epochs: int, cfg: dict, device) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}: choose from {METHODS}")
    return _REGISTRY[name](labels, num_classes, epochs, cfg, device)
