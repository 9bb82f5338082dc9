"""Training shared by the strategies whose network has one path per task
(`clbench.path_network.TaskPathNet`: ccgn, hat, hat_tc), including the class setting's
task classifier (Abati et al., CVPR 2020): all learned paths run on the input, their
features are concatenated, and an MLP picks the task whose head answers.
"""

from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from avalanche.training.templates import SupervisedTemplate
from pydantic import Field
from torch.utils.data import DataLoader, TensorDataset

from clbench.loading import eval_batches
from clbench.path_network import PathTrace, TaskPathNet
from clbench.registry import Hyperparameters, build_optimizer


class TaskClassifierHparams(Hyperparameters):
    memory_size: int = Field(500, gt=0, description="class setting: episodic memory C of the task classifier")
    classifier_epochs: int = Field(10, gt=0, description="class setting: task-classifier epochs after each task")
    classifier_lr: float = Field(1e-3, gt=0, description="class setting: task-classifier Adam learning rate")
    memory_selection: Literal["random", "herding"] = Field(
        "random", description="class setting: which training examples of a task the memory keeps")
    classifier_input: Literal["features", "normalised_features"] = Field(
        "features", description="class setting: the task classifier reads every path's features as they are, or each "
                                "path's scaled to the same norm")
    classifier_layers: Literal["last", "all"] = Field(
        "last", description="class setting: the task classifier reads each path's last-layer features (the paper's), "
                            "or the output of every stage of the backbone averaged over positions")
    classifier_training: Literal["after", "during", "both", "during_balanced"] = Field(
        "during_balanced", description="class setting: train the task classifier after each task on the frozen paths' features, "
                             "during each task with a memory batch replayed through every path (its loss also "
                             "trains the task's path), both, or during each task and then on the memory alone")


def herding_order(features: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` examples in herding order (Welling 2009, as iCaRL selects
    exemplars): each next one brings the mean of the L2-normalised features chosen so far
    closest to the mean of all."""
    features = F.normalize(features, dim=1)
    target, chosen_sum = features.mean(0), torch.zeros(features.shape[1])
    order = []
    for k in range(1, min(count, len(features)) + 1):
        distances = ((target - (chosen_sum + features) / k) ** 2).sum(1)
        distances[order] = torch.inf
        order.append(int(distances.argmin()))
        chosen_sum += features[order[-1]]
    return torch.tensor(order, dtype=torch.long)


def memory_after_last_task(memory_size: int, trained_sizes: list[int]) -> int:
    """Examples the task classifier's memory holds after the last task: memory_size //
    tasks of each task's training examples, or all of them where it has fewer."""
    return sum(min(memory_size // len(trained_sizes), size) for size in trained_sizes)


def other_tasks_parameters(model: TaskPathNet, task: int) -> list[torch.Tensor]:
    """The parameters of the heads and mask modules of `model`'s tasks other than `task`,
    less those `task`'s path uses too (HAT's embeddings hold every task's): what its
    optimiser leaves out (`TaskPathTraining.make_optimizer`)."""
    def own(of: int) -> list[torch.Tensor]:
        return [p for m in model.task_modules(of) for p in m.parameters(recurse=False)]

    mine = set(map(id, own(task)))
    return [p for other in range(len(model.heads)) if other != task for p in own(other) if id(p) not in mine]


class TaskPathTraining(SupervisedTemplate):
    """Each task trains its own path and head on task-local labels; the optimiser state is
    reset for every task (momentum left over would move protected weights). After a task
    the subclass's `protect_task()` protects its path, its head is frozen and, in the
    class setting, the episodic memory is updated and the task classifier fitted.

    Memory: memory_size // tasks random training examples per learned task. The
    classifier is trained with a loss weighted so that every task counts equally, either
    during each task (the default): every batch is joined by as many stored examples of
    past tasks, all run through every path, and the classifier's loss also trains the
    task's own path (the paper's "current task's data plus an episodic memory"; on Split
    MNIST it beat training after the task, see results/ablations/task_classifier), or
    after each task on the frozen paths' features of the task's training data plus the
    memory, for classifier_epochs with Adam, or both; or during each task and then after
    it on the memory alone, where every task has as many examples. The learned paths give
    the classifier their features through their compact paths (`TaskPathNet.learned_paths`),
    as at test: the masked layers' up to float rounding, in less time."""

    def __init__(self, *, hp, **kwargs):
        super().__init__(**kwargs)
        self.hp = hp
        if self.model.setting == "class":
            self.model.normalise_task_features = hp.classifier_input == "normalised_features"
        self.usage_rows = []  # kernel_usage.csv
        self.memory: dict[int, torch.Tensor] = {}  # task -> stored inputs

    @property
    def task(self) -> int:
        return self.experience.current_experience

    def artifacts(self) -> dict[str, pd.DataFrame]:
        return {"kernel_usage": pd.DataFrame(self.usage_rows)}

    def make_optimizer(self, **kwargs):
        """A fresh state for every task, over the parameters the task trains: the other
        tasks' heads and gating modules (frozen, or unused until their task) get no
        gradient, and Adam and zero_grad would still walk them in Python on every step
        (ccgn's small CNN on 5 tasks: 80 of its 106 tensors). Their gradients are
        cleared, as zero_grad no longer reaches them."""
        super().make_optimizer(**{**kwargs, "reset_optimizer_state": True})
        others = other_tasks_parameters(self.model, self.task)
        for parameter in others:
            parameter.grad = None
        group, = self.optimizer.param_groups
        left_out = set(map(id, others))
        group["params"] = [parameter for parameter in group["params"] if id(parameter) not in left_out]

    def _before_training_exp(self, **kwargs):
        classes = self.model.task_classes[self.task]
        self.local_label = torch.full((self.model.n_classes,), -1, dtype=torch.long, device=self.device)
        self.local_label[classes] = torch.arange(len(classes), device=self.device)
        super()._before_training_exp(**kwargs)

    @property
    def classifier_trains_during_task(self) -> bool:
        return self.model.setting == "class" and self.hp.classifier_training != "after" and self.task > 0

    def forward(self):
        """The current task's path; its trace (masks, MACs) is kept for the loss. When the
        task classifier trains during the task, a batch from the memory joins the input and
        the classifier's loss on every path's features is kept too."""
        if not self.classifier_trains_during_task:
            logits, self.trace = self.model.forward_path(self.mb_x, self.task)
            return logits
        model, batch = self.model, len(self.mb_x)
        stored, stored_tasks = self.memory_batch()
        x = torch.cat([self.mb_x, stored])
        trace = PathTrace()
        features, read = model.masked_path(x, self.task, trace)
        self.trace = PathTrace(masks=[mask[:batch] for mask in trace.masks],
                               probabilities=[p[:batch] for p in trace.probabilities])
        model.eval()  # learned paths as at test: deterministic gates, stored statistics
        with torch.no_grad():  # so their compact paths, cut again after each optimiser step
            learned = model.learned_paths(x)[0]
        model.train()
        tasks = torch.cat([torch.full((batch,), self.task, device=self.device), stored_tasks])
        every_task_equally = 1 / torch.bincount(tasks, minlength=self.task + 1).clamp(min=1).float()
        self.classifier_loss = F.cross_entropy(model.classify_task(torch.cat([*learned, read], 1)), tasks,
                                               weight=every_task_equally)
        return model.heads[self.task](features[:batch])

    def memory_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch's worth of stored inputs of the learned tasks, and their tasks."""
        inputs = torch.cat([self.memory[task] for task in range(self.task)])
        tasks = torch.cat([torch.full((len(self.memory[task]),), task) for task in range(self.task)])
        chosen = torch.randint(len(inputs), (self.train_mb_size,))
        return inputs[chosen].to(self.device), tasks[chosen].to(self.device)

    def task_loss(self) -> torch.Tensor:
        """Cross-entropy of the task's head, plus the task classifier's loss when it trains
        during the task."""
        labels = self.mb_y if self.model.setting == "task" else self.local_label[self.mb_y]
        loss = self._criterion(self.mb_output, labels)
        return loss + self.classifier_loss if self.classifier_trains_during_task else loss

    def protect_task(self):
        raise NotImplementedError

    def record_usage(self, name: str, used: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> None:
        """One row of kernel_usage.csv: the share of a layer's kernels this task used, of
        those already in use by earlier tasks, and of those in use after it."""
        self.usage_rows.append({"after_task": self.task + 1, "layer": name, "kernels": len(used),
                                "used": used.float().mean().item(), "reused": (used & before).float().mean().item(),
                                "frozen": after.float().mean().item(), "free": 1 - after.float().mean().item()})

    def _after_training_exp(self, **kwargs):
        self.protect_task()
        self.model.heads[self.task].requires_grad_(False)
        self.model.tasks_learned = self.task + 1
        if self.model.setting == "class":
            self.update_memory()
            if self.hp.classifier_training != "during":
                self.train_task_classifier(memory_only=self.hp.classifier_training == "during_balanced")
        super()._after_training_exp(**kwargs)

    @torch.no_grad()
    def update_memory(self):
        """Keep memory_size // tasks examples of each learned task: the first of each past
        task's stored ones, and of this task's a random sample or, with herding, those in
        herding order on its path's features, class by class in turn."""
        per_task = self.hp.memory_size // (self.task + 1)
        for past in self.memory:
            self.memory[past] = self.memory[past][:per_task]
        dataset = self.adapted_dataset.eval()
        if self.hp.memory_selection == "random":
            chosen = torch.randperm(len(dataset))[:per_task]
        else:
            self.model.eval()
            features, labels = [], []
            for x, y, _ in eval_batches(dataset, self.eval_mb_size):
                features.append(self.model.backbone(x.to(self.device), self.task, PathTrace()).cpu())
                labels.append(y)
            features, labels = torch.cat(features), torch.cat(labels)
            orders = [index[herding_order(features[index], per_task)]
                      for index in (torch.nonzero(labels == label).flatten() for label in labels.unique())]
            chosen = torch.stack([order[:min(map(len, orders))] for order in orders], 1).flatten()[:per_task]
        self.memory[self.task] = next(iter(eval_batches(dataset.subset(chosen.tolist()), len(chosen))))[0]

    def train_task_classifier(self, memory_only: bool):
        """Fit the task classifier on the frozen paths' features of the task's training data
        and the past tasks' memory, or of the memory alone (as many examples of every task)."""
        model, task = self.model, self.task
        model.eval()
        inputs = [] if memory_only else [(x, torch.full((len(x),), task)) for x, _, _ in
                                         eval_batches(self.adapted_dataset.eval(), self.eval_mb_size)]
        inputs += [(x, torch.full((len(x),), past)) for past, x in self.memory.items() if memory_only or past != task]
        with torch.no_grad():
            features = torch.cat([torch.cat(model.learned_paths(x.to(self.device))[0], 1) for x, _ in inputs])
        tasks = torch.cat([t for _, t in inputs]).to(self.device)
        counts = torch.bincount(tasks, minlength=task + 1).float()
        weights = counts.sum() / (len(counts) * counts)
        optimizer = build_optimizer("adam", model.task_classifier.parameters(), self.hp.classifier_lr)
        model.task_classifier.train()
        for _ in range(self.hp.classifier_epochs):
            for f, t in DataLoader(TensorDataset(features, tasks), batch_size=self.train_mb_size, shuffle=True):
                loss = F.cross_entropy(model.classify_task(f), t, weight=weights)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
